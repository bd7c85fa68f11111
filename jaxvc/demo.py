"""``jaxvc demo``: the whole loop on a CPU in minutes, with no downloads.

1. Trains a tiny VideoMaker model (PISA + GIRL, ``configs/videomaker.py:demo``) from scratch on the synthetic subject
   world, whose captions say how the subject moves but not what it looks like ("a subject moves left on a sky
   background"): only the reference image carries the identity. Checkpoints go to ``<out>/run``.
2. For subjects it never saw (held out of training) and several motions, generates a video from the subject's
   reference image and the caption, and a **baseline without the reference** (the same model and prompt with a zero
   reference latent, the branch trained by reference dropout).
3. Scores both with the world's exact metrics (``jaxvc/eval/synthetic_metrics.py``) and prints the table; writes
   MP4/GIF videos, a contact sheet (reference | with reference | without) and ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "videomaker.py"
TABLE_ROWS = (("fidelity", "subject fidelity (shape+colour+pattern right)"),
              ("color_accuracy", "colour accuracy"), ("shape_accuracy", "shape accuracy"),
              ("pattern_accuracy", "pattern accuracy"), ("appearance_similarity", "appearance similarity"),
              ("alignment", "motion/text alignment"), ("motion_score", "motion score"),
              ("temporal_consistency", "temporal consistency"),
              ("copy_paste_rate", "copy-paste rate (lower is better)"),
              ("subject_presence", "subject present"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output directory (run, checkpoints, videos, metrics)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global training batch (default: the config's)")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps when generating")
    parser.add_argument("--guidance-scale", type=float, default=2.5,
                        help="classifier-free guidance scale (with and without the reference together). 2.5: with "
                             "an earlier demo model (20x weight on the noisiest timesteps), 6 broke the samples "
                             "(alignment 0.00, colour accuracy 0.11), 1 and 2.5 both gave alignment 1.00 and 2.5 the "
                             "better colour accuracy (0.60 vs 0.49)")
    parser.add_argument("--reference-guidance-scale", type=float, default=None,
                        help="guide the reference separately with this scale from --reference-guidance-start on "
                             "(default: together with the text). Measured on that earlier model, 6 from 40%% of the "
                             "steps, on two sets of sampling seeds: appearance similarity 0.24 -> 0.28 on both, colour "
                             "accuracy 0.60 -> 0.59 and 0.52 -> 0.63, alignment 1.00 -> 0.94 and 0.91 -> 0.84, "
                             "exact fidelity no better")
    parser.add_argument("--reference-guidance-start", type=float, default=0.4,
                        help="fraction of the sampling steps before which the reference is guided like the text")
    parser.add_argument("--motions", default="left,right,up,down",
                        help="comma-separated motions generated for every held-out subject")
    parser.add_argument("--subjects", type=int, default=8, help="how many held-out subjects to evaluate")
    parser.add_argument("--videos", type=int, default=4, help="how many of the generated videos to write as MP4/GIF")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --override optim.lr=3e-4 (repeatable)")


def run(args) -> int:
    from jaxvc.config_utils import apply_overrides, load_config, write_config
    from jaxvc.data.synthetic import caption
    from jaxvc.data.training_streams import from_config as data_from_config, world_from_config
    from jaxvc.eval.synthetic_metrics import evaluate_videos
    from jaxvc.methods import build_method
    from jaxvc.train.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(f"{CONFIG}:demo")
    # the run samples as the demo does: `jaxvc generate --model OUT/run` then takes these settings by default
    overrides = [("validation.steps", str(args.sampling_steps)),
                 ("validation.guidance_scale", str(args.guidance_scale))]
    overrides += [tuple(o.split("=", 1)) for o in args.override]
    if args.steps is not None:
        overrides.append(("steps", str(args.steps)))
    if args.batch_size is not None:
        overrides.append(("batch_size", str(args.batch_size)))
    overrides.append(("seed", str(args.seed)))
    config = apply_overrides(config, overrides)
    config.workdir = str(out / "run")
    write_config(config, out)

    # ------------------------------------------------------------------------------------------ 1. train
    start = time.perf_counter()
    method = build_method(config)
    result = train(config, method, lambda rows: data_from_config(config, rows), out / "run")
    train_seconds = time.perf_counter() - start
    losses = [h["loss"] for h in result.history if "loss" in h]
    print(f"\ntrained {result.final_step} steps in {train_seconds:.0f}s; loss first/last 20 steps: "
          f"{np.mean(losses[:20]):.4f} -> {np.mean(losses[-20:]):.4f}" if losses else "")

    # ------------------------------------------------------------------------------------------ 2. generate
    pipe = method.pipeline(result.state.full_params(), method.tokenizer)
    world = world_from_config(config)
    motions = [m.strip() for m in args.motions.split(",") if m.strip()]
    subjects = list(world.held_out_subject_ids[:args.subjects])
    size, frames = config.model.image_size, config.model.num_frames
    subject_ids, motion_names, references, prompts, seeds = [], [], [], [], []
    for index, subject_id in enumerate(subjects):
        for motion in motions:
            subject_ids.append(subject_id)
            motion_names.append(motion)
            references.append(world.reference_image(subject_id, seed=args.seed))
            prompts.append(caption(world.subject(subject_id), motion, "sky", name=config.data.caption_name))
            seeds.append(args.seed + 1000 * index + motions.index(motion))
    # every video of a branch in one sampling loop (each from its own seed, as made alone)
    common = dict(num_frames=frames, height=size, width=size, num_inference_steps=args.sampling_steps,
                  guidance_scale=args.guidance_scale, seeds=seeds)
    start = time.perf_counter()
    videos = {"reference": list(pipe.generate_videos(references, prompts, **common,
                                                     reference_guidance_scale=args.reference_guidance_scale,
                                                     reference_guidance_start=args.reference_guidance_start)),
              "baseline": list(pipe.generate_videos(None, prompts, **common))}
    sample_seconds = time.perf_counter() - start
    print(f"generated {2 * len(subject_ids)} videos ({len(subjects)} held-out subjects x {len(motions)} motions, "
          f"with and without the reference) in {sample_seconds:.0f}s")

    # ------------------------------------------------------------------------------------------ 3. evaluate
    scores = {name: evaluate_videos(world, vids, subject_ids, motion_names, references)
              for name, vids in videos.items()}
    _print_table(scores)
    _write_outputs(out, videos, references, prompts, scores, args.videos, train_seconds, sample_seconds, result)
    return 0


def _print_table(scores) -> None:
    print(f"\n{'metric (held-out subjects)':<46} {'with reference':>15} {'no reference':>13}")
    for key, label in TABLE_ROWS:
        if key in scores["reference"]:
            print(f"{label:<46} {scores['reference'][key]:>15.3f} {scores['baseline'][key]:>13.3f}")


def _write_outputs(out, videos, references, prompts, scores, num_videos, train_seconds, sample_seconds, result):
    from jaxvc import media

    rows, labels = [], []
    for i in range(len(prompts)):
        rows += [references[i][None], videos["reference"][i], videos["baseline"][i]]
        labels += ["reference", "with reference", "no reference"]
        if i < num_videos:
            for kind in ("reference", "baseline"):
                media.write_mp4(out / f"video_{i}_{kind}.mp4", videos[kind][i])
                media.write_gif(out / f"video_{i}_{kind}.gif", videos[kind][i])
    media.save_png(out / "contact_sheet.png", media.contact_sheet(rows, labels, cell=64))
    summary = {name: {k: v for k, v in s.items() if k != "per_video"} for name, s in scores.items()}
    summary.update(prompts=prompts, train_seconds=train_seconds, sample_seconds=sample_seconds,
                   final_step=int(result.final_step))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nwrote {out}/contact_sheet.png, {min(num_videos, len(prompts))} x 2 MP4/GIF videos, {out}/metrics.json")
