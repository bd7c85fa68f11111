"""``jaxvc generate``: a video of the subject in ``--reference`` doing what ``--prompt`` says (VideoMaker sampling), or
a text-to-video sample of a model whose subject is in its weights (Still-Moving runs, ``--text-to-video`` with
``--lora`` on a plain AnimateDiff folder)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="diffusers AnimateDiff/SD pipeline folder, a jaxvc checkpoint from `jaxvc convert`, or "
                             "a training run folder (`jaxvc train --workdir DIR`; the demo's is OUT/run)")
    parser.add_argument("--step", type=int, default=None,
                        help="training run folders: the checkpoint step to load (default: the latest)")
    parser.add_argument("--no-ema", action="store_true",
                        help="training run folders: the raw weights, not the EMA weights the run keeps")
    parser.add_argument("--motion-adapter", default=None,
                        help="diffusers MotionAdapter folder or AnimateDiff motion-module file, if --model is a "
                             "plain SD1.5 folder")
    parser.add_argument("--reference", default=None,
                        help="reference image of the subject (any format PIL reads); required by reference-conditioned "
                             "models (VideoMaker), refused by text-to-video ones (Still-Moving runs, --text-to-video)")
    parser.add_argument("--text-to-video", action="store_true",
                        help="sample --model as a plain text-to-video AnimateDiff model: no reference frame")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA file (diffusers, peft or kohya/A1111 format; e.g. a DreamBooth LoRA of SD1.5) "
                             "merged into the UNet and text encoder at SCALE (default 1.0); repeatable")
    parser.add_argument("--prompt", required=True, help="what the subject should do")
    parser.add_argument("--negative-prompt", default="", help="prompt for the unconditional branch")
    parser.add_argument("--guidance-scale", type=float, default=8.0, help="classifier-free guidance scale")
    parser.add_argument("--reference-guidance-scale", type=float, default=None,
                        help="guide the reference separately with this scale (a third branch: text only); default: "
                             "text and reference together with --guidance-scale, as the paper")
    parser.add_argument("--reference-guidance-start", type=float, default=0.0,
                        help="with --reference-guidance-scale: the fraction of the steps (the layout) before which "
                             "the reference is guided with --guidance-scale")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    parser.add_argument("--frames", type=int, default=16, help="number of video frames (models with the Wan video VAE: 1 + 4k, e.g. 17, 49, 81)")
    parser.add_argument("--height", type=int, default=512, help="video height in pixels")
    parser.add_argument("--width", type=int, default=512, help="video width in pixels")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the written MP4/GIF")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="UNet compute dtype (default: the checkpoint's, float32)")
    parser.add_argument("--attention-backend", default=None, choices=["xla", "jax", "cudnn", "splash"],
                        help="attention implementation (cudnn: flash attention on NVIDIA GPUs; splash: flash "
                             "attention on TPUs)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt/.bin weight files")
    parser.add_argument("--out", default="outputs", help="output directory")
    parser.add_argument("--name", default="video", help="base name of the output files")


def run(args) -> int:
    from jaxvc.pipeline import CustomVideoPipeline

    start = time.perf_counter()
    pipe = CustomVideoPipeline.from_pretrained(args.model, motion_adapter=args.motion_adapter,
                                               allow_pickle=args.allow_pickle, dtype=args.dtype,
                                               attention_backend=args.attention_backend, step=args.step,
                                               use_ema=not args.no_ema)
    if args.text_to_video:
        if pipe.conditioning is not None:
            print(f"jaxvc generate: {args.model} takes its reference through its own network; --text-to-video is "
                  "for AnimateDiff models that take it as an extra frame", file=sys.stderr)
            return 2
        pipe.reference_frame = False
    for spec in args.lora:
        path, scale = parse_lora_argument(spec)
        pipe.merge_lora(path, scale=scale, allow_pickle=args.allow_pickle)
    if pipe.takes_reference and args.reference is None:
        print(f"jaxvc generate: {args.model} is reference-conditioned: pass --reference IMAGE (or --text-to-video for "
              "a plain AnimateDiff model)", file=sys.stderr)
        return 2
    if not pipe.takes_reference and args.reference is not None:
        print(f"jaxvc generate: {args.model} is text-to-video (its subject is in its weights): drop --reference",
              file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    frames = pipe(args.reference, args.prompt, negative_prompt=args.negative_prompt,
                  guidance_scale=args.guidance_scale, reference_guidance_scale=args.reference_guidance_scale,
                  reference_guidance_start=args.reference_guidance_start, num_inference_steps=args.steps,
                  seed=args.seed, num_frames=args.frames, height=args.height, width=args.width, eta=args.eta)
    files = pipe.save(frames, args.out, args.name, reference=args.reference, fps=args.fps)
    files["record"] = write_record(args, files["mp4"], getattr(pipe, "trained_step", None),
                                   getattr(pipe, "trained_with_ema", None))
    print(f"loaded in {loaded - start:.1f}s, generated {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} "
          f"in {time.perf_counter() - loaded:.1f}s")
    for kind, path in files.items():
        print(f"  {kind}: {path}")
    return 0


def parse_lora_argument(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (FILE, SCALE)."""
    path, _, scale = spec.rpartition(":")
    if path and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def write_record(args, video: Path, trained_step: int | None = None, ema: bool | None = None) -> Path:
    """``<name>.json`` beside the video: what made it, and what ``jaxvc eval`` reads (video, prompt, reference)."""
    reference = None if args.reference is None else str(Path(args.reference).resolve())
    record = {"video": video.name, "prompt": args.prompt, "reference": reference, "lora": list(args.lora),
              "negative_prompt": args.negative_prompt, "model": args.model, "motion_adapter": args.motion_adapter,
              "guidance_scale": args.guidance_scale, "reference_guidance_scale": args.reference_guidance_scale,
              "reference_guidance_start": args.reference_guidance_start, "steps": args.steps, "eta": args.eta,
              "seed": args.seed, "frames": args.frames, "height": args.height, "width": args.width,
              "dtype": args.dtype, "attention_backend": args.attention_backend, "trained_step": trained_step,
              "ema": ema}
    path = video.with_suffix(".json")
    path.write_text(json.dumps(record, indent=2))
    return path
