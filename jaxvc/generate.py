"""``jaxvc generate``: a video of the subject in ``--reference`` doing what ``--prompt`` says (VideoMaker sampling), or
a text-to-video sample of a model whose subject is in its weights (Still-Moving runs, ``--text-to-video`` with
``--lora`` on a plain AnimateDiff folder), or a diffusers Wan pipeline folder's video: text-to-video
(``jaxvc/wan_pipeline.py``) or from ``--reference`` as the first frame (``jaxvc/wan_i2v_pipeline.py``).
``--prompts`` generates a whole evaluation set with one loaded model and one compiled sampler
(``jaxvc/data/prompt_sets.py``): each video's record, and ``manifest.jsonl`` of them all, are what ``jaxvc eval``
reads; videos whose record exists are kept, so a stopped run resumes, unless their record says another prompt,
seed, reference or setting made them (refused before the model loads: ``kept_record_error``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxvc.diffusion.samplers import SAMPLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="diffusers AnimateDiff/SD pipeline folder, a jaxvc checkpoint from `jaxvc convert`, a "
                             "training run folder (`jaxvc train --workdir DIR`; the demo's is OUT/run), or a diffusers "
                             "Wan pipeline folder (--frames 1 + 4k): Wan2.1-T2V-* and Wan2.2-T2V-A14B (text-to-video), "
                             "Wan2.1-I2V-*, Wan2.1-FLF2V-*, Wan2.2-I2V-A14B and Wan2.2-TI2V-5B (image-to-video: "
                             "--reference is the first frame)")
    parser.add_argument("--step", type=int, default=None,
                        help="training run folders: the checkpoint step to load (default: the latest)")
    parser.add_argument("--no-ema", action="store_true",
                        help="training run folders: the raw weights, not the EMA weights the run keeps")
    parser.add_argument("--motion-adapter", default=None,
                        help="diffusers MotionAdapter folder or AnimateDiff motion-module file, if --model is a "
                             "plain SD1.5 folder")
    parser.add_argument("--unet-weights", default=None, metavar="FILE",
                        help="AnimateDiff/SD folders: a UNet state dict, whole or partial, put over the folder's UNet "
                             "weights, e.g. VideoMaker's released human_pytorch_model.bin (its authors load it with "
                             "strict=False; here a key the model lacks, or a wrong shape, is an error); AnimateDiff "
                             "UNet3D or diffusers UNetMotionModel keys; .bin/.ckpt need --allow-pickle")
    parser.add_argument("--reference", default=None,
                        help="reference image of the subject (any format PIL reads); required by reference-conditioned "
                             "models (VideoMaker; a Wan image-to-video folder's first frame), refused by text-to-video "
                             "ones (Still-Moving runs, --text-to-video, Wan text-to-video folders). It, --last-frame "
                             "and every --prompts record's \"reference\" (and \"references\") are read before the "
                             "model loads: a missing or unreadable image is an error (exit status 2) at once")
    parser.add_argument("--last-frame", default=None, metavar="IMAGE",
                        help="Wan image-to-video folders (FLF2V; not TI2V): the video's last frame, --reference its "
                             "first")
    parser.add_argument("--eval-references", nargs="+", default=[], metavar="IMAGE_OR_FOLDER",
                        help="images of the subject (files, or folders of them) written into each record as "
                             "\"references\" for `jaxvc eval` (CLIP-I and DINO-I against all of them, as "
                             "CustomCrafter's protocol), not given to the model: what the videos of text-to-video "
                             "models whose subject is in the weights (CustomCrafter, Still-Moving runs) are scored "
                             "against; a --prompts record's own \"references\" win")
    parser.add_argument("--text-to-video", action="store_true",
                        help="sample --model as a plain text-to-video AnimateDiff model: no reference frame")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="a LoRA file (diffusers, peft or kohya/A1111 format; e.g. a DreamBooth LoRA of SD1.5) "
                             "merged into the UNet and text encoder at SCALE (default 1.0); repeatable; Wan folders: "
                             "into the DiT (a two-expert Wan 2.2 folder's high-noise transformer)")
    parser.add_argument("--lora-2", action="append", default=[], metavar="FILE[:SCALE]",
                        help="two-expert Wan 2.2 folders (A14B): a LoRA merged into the low-noise expert "
                             "(transformer_2); repeatable")
    parser.add_argument("--prompt", default=None,
                        help="what the subject should do (or --prompts; with --prompts, the prompt of records "
                             "without their own)")
    parser.add_argument("--prompts", default=None, metavar="SET",
                        help="generate a set instead of one video: 'ucf101' (the 101 UCF-101 class names, the "
                             "zero-shot protocol), a .txt file (one prompt per line) or a .jsonl/.json file of "
                             "{\"prompt\", \"reference\", \"name\", \"seed\", \"negative_prompt\"} records "
                             "(`jaxvc motion-bins` writes such files); --reference, --seed and --negative-prompt are "
                             "the defaults of records without their own")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --prompts: videos per prompt, with seeds seed, seed + 1, ... (named NAME_000, ...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --prompts: generate again the videos whose record is already in --out (default: "
                             "keep them, so that a stopped run resumes; a kept record made with another prompt, "
                             "seed, reference or sampling setting is an error, exit status 2, before anything is "
                             "generated)")
    parser.add_argument("--negative-prompt", default=None,
                        help="prompt for the unconditional branch (default: the model's: a training run's "
                             "config.validation.negative_prompt, else empty)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's: a training run's validation "
                             "setting, the method's published one unless the run changed it, e.g. 8 VideoMaker, 12 "
                             "CustomCrafter, 7.5 MicroCinema, 6 S2V; 8 for AnimateDiff folders, 5 for Wan folders)")
    parser.add_argument("--guidance-scale-2", type=float, default=None,
                        help="two-expert Wan 2.2 folders (A14B): the low-noise expert's guidance scale (default: "
                             "--guidance-scale)")
    parser.add_argument("--reference-guidance-scale", type=float, default=None,
                        help="guide the reference separately with this scale (a third branch: text only); default: "
                             "text and reference together with --guidance-scale, as the paper")
    parser.add_argument("--reference-guidance-start", type=float, default=0.0,
                        help="with --reference-guidance-scale: the fraction of the steps (the layout) before which "
                             "the reference is guided with --guidance-scale")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's, as --guidance-scale: e.g. 30 VideoMaker, 50 "
                             "CustomCrafter, MicroCinema and S2V; 30 for AnimateDiff folders, 50 for Wan folders)")
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="the solver (default: the model's own (a training run's config.validation.sampler if "
                             "set): ddim for the UNet methods, euler for the S2V "
                             "method, the folder's (UniPC) for a Wan folder); dpm++ (2M), dpm++-karras, dpm++-sde "
                             "(2M SDE), dpm++-sde-karras, unipc (Wan's pipelines' solver), unipc-karras: diffusers' "
                             "multistep schedulers, good in 20-25 steps; the -karras ones run DDPM-schedule (UNet) "
                             "models only. The record's \"sampler\" is the one that ran (a Wan folder's own: its "
                             "scheduler class, e.g. UniPCMultistepScheduler)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta (0: deterministic; --sampler ddim only); default: the model's with DDIM (1 for "
                             "CustomCrafter runs, as its paper; 0 otherwise), 0 with the other samplers")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    parser.add_argument("--frames", type=int, default=None,
                        help="number of video frames (models with the Wan video VAE: 1 + 4k, e.g. 17, 49, 81; "
                             "default: the model's, 16 for AnimateDiff, 81 for a Wan folder)")
    parser.add_argument("--height", type=int, default=None,
                        help="video height in pixels (default: the model's, 512 for AnimateDiff, 480 for Wan)")
    parser.add_argument("--width", type=int, default=None,
                        help="video width in pixels (default: the model's, 512 for AnimateDiff, 832 for Wan)")
    parser.add_argument("--fps", type=int, default=None,
                        help="frames per second of the written MP4/GIF, and the record's \"fps\" (default: the "
                             "rate the model makes videos for: 16 for Wan 2.1 and Wan 2.2 A14B folders, 24 for Wan "
                             "2.2 TI2V-5B, 8 for AnimateDiff folders and the methods' runs; another rate plays the "
                             "motion faster or slower, and `jaxvc eval`'s dynamic degree reads it)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype of the UNet / the Wan DiT and text encoder, which also keep their "
                             "weight matrices in it (the same videos at half their weight memory; the VAE stays "
                             "float32); default: the checkpoint's (a run's compute_dtype), float32. The record's "
                             "\"dtype\" is the one used")
    parser.add_argument("--attention-backend", default=None, choices=["xla", "jax", "cudnn", "splash"],
                        help="attention implementation (cudnn: flash attention on NVIDIA GPUs; splash: flash "
                             "attention on TPUs); default: the model's (a run's config.model.attention_backend), xla. "
                             "The record's \"attention_backend\" is the one used")
    parser.add_argument("--mesh", default=None, metavar="AXES",
                        help="sample on a mesh of this machine's devices (jaxvc/parallel/inference.py); default: one "
                             "device. Wan folders and S2V runs: e.g. fsdp=8 or fsdp=4,sequence=2, parameters sharded "
                             "by the rule table, the video's tokens over sequence x fsdp. UNet models (AnimateDiff "
                             "folders, VideoMaker/Still-Moving/MicroCinema/CustomCrafter runs): data=N, the weights "
                             "on every device and each batch of --prompts videos split over them")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="with --prompts, UNet models and S2V runs: videos per sampling loop (each from its "
                             "own seed: the same videos as one at a time; the last batch is padded); default: the "
                             "mesh's data size, 1 without --mesh")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickled .ckpt/.bin weight files")
    parser.add_argument("--out", default="outputs", help="output directory")
    parser.add_argument("--name", default="video", help="base name of the output files (one video; --prompts names "
                                                         "each video after its record, class or index)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after generating, sample the last video (with --prompts: the last batch) once more, "
                             "compiled and warm, under JAX's profiler into DIR (plugins/profile/<time>/"
                             "<host>.xplane.pb: TensorBoard's Profile tab, XProf or Perfetto); nothing is written "
                             "again. Costs one more video (batch)")


def run(args) -> int:
    from jaxvc.data.prompt_sets import PromptSetError, read_prompt_set
    from jaxvc.pipeline import CustomVideoPipeline, model_settings

    if args.prompt is None and args.prompts is None:
        print("jaxvc generate: give --prompt TEXT (one video) or --prompts SET (many)", file=sys.stderr)
        return 2
    items = None
    if args.prompts is not None:
        try:
            items = read_prompt_set(args.prompts, args.repeats, args.seed, default_prompt=args.prompt)
        except PromptSetError as error:
            print(f"jaxvc generate: {error}", file=sys.stderr)
            return 2
    if args.batch_size is not None and (args.batch_size < 1 or (args.batch_size > 1 and items is None)):
        # refused before the model loads
        print(f"jaxvc generate: --batch-size {args.batch_size}: " + ("expected 1 or more" if args.batch_size < 1 else
              "batches are for sets of videos (--prompts)"), file=sys.stderr)
        return 2
    if args.fps is not None and args.fps < 1:
        print(f"jaxvc generate: --fps {args.fps}: expected 1 or more frames per second", file=sys.stderr)
        return 2
    try:
        args.eval_references = evaluation_images(args.eval_references)
    except FileNotFoundError as error:
        print(f"jaxvc generate: --eval-references: {error}", file=sys.stderr)
        return 2
    error = input_image_error(args, items) or kept_record_error(items, args)  # what the command fixes
    if error:
        print(f"jaxvc generate: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:  # LoRA files are merged as the weights load, in float32, before --dtype stores matrices in bf16
        pipe = CustomVideoPipeline.from_pretrained(
            args.model, motion_adapter=args.motion_adapter, allow_pickle=args.allow_pickle, dtype=args.dtype,
            attention_backend=args.attention_backend, step=args.step, use_ema=not args.no_ema,
            unet_weights=args.unet_weights,
            lora=[parse_lora_argument(spec) for spec in args.lora],
            lora_2=[parse_lora_argument(spec) for spec in args.lora_2])
    except (ValueError, FileNotFoundError) as error:  # the loaders' errors name the file and what was expected
        print(f"jaxvc generate: {error}", file=sys.stderr)
        return 2
    if args.text_to_video:
        if pipe.conditioning is not None:
            print(f"jaxvc generate: {args.model} takes its reference through its own network; --text-to-video is "
                  "for AnimateDiff models that take it as an extra frame", file=sys.stderr)
            return 2
        pipe.reference_frame = False
    # the flags not given are the model's (its size and sampling), as in Python calls
    settings = model_settings(pipe, num_frames=args.frames, height=args.height, width=args.width,
                              num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                              sampler=args.sampler, negative_prompt=args.negative_prompt)
    for name, key in (("frames", "num_frames"), ("height", "height"), ("width", "width"),
                      ("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"), ("eta", "eta"),
                      ("sampler", "sampler"), ("negative_prompt", "negative_prompt")):
        setattr(args, name, settings[key])
    args.fps = pipe.default_fps if args.fps is None else args.fps
    # what ran, for the records: a defaulted setting is the model's, which a record of None would not tell
    two_experts = getattr(pipe, "has_two_experts", False)  # the low-noise expert's scale defaults to the first's
    args.used = {"sampler": pipe.sampler_name(args.sampler), "dtype": pipe.compute_dtype,
                 "attention_backend": pipe.attention_backend,
                 "guidance_scale_2": args.guidance_scale_2 if args.guidance_scale_2 is not None or not two_experts
                 else args.guidance_scale}
    try:
        args.model_options = model_options(pipe, args)
    except ValueError as error:
        print(f"jaxvc generate: {error}", file=sys.stderr)
        return 2
    if args.mesh is not None:
        try:
            pipe.shard(args.mesh)
        except ValueError as error:
            print(f"jaxvc generate: --mesh {args.mesh}: {error}", file=sys.stderr)
            return 2
    error = batch_size_error(pipe, args, items)
    if error:
        print(f"jaxvc generate: {error}", file=sys.stderr)
        return 2
    references = [args.reference] if items is None else [item.reference or args.reference for item in items]
    if pipe.takes_reference and None in references:
        where = "" if items is None else f" (item '{items[references.index(None)].name}' of {args.prompts} has none)"
        print(f"jaxvc generate: {args.model} is reference-conditioned: pass --reference IMAGE{where} (or "
              "--text-to-video for a plain AnimateDiff model)", file=sys.stderr)
        return 2
    if not pipe.takes_reference and any(reference is not None for reference in references):
        print(f"jaxvc generate: {args.model} is text-to-video (its subject is in its weights): drop --reference"
              + ("" if items is None else f" and the records' \"reference\" in {args.prompts}"), file=sys.stderr)
        return 2
    error = kept_record_error(items, args, pipe)  # again, with the model's defaults for what the command left out
    if error:
        print(f"jaxvc generate: {error}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    if items is not None:
        return generate_set(pipe, items, args, loaded - start)
    frames = pipe(args.reference, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                  **sampling_options(args))
    files = pipe.save(frames, args.out, args.name, reference=args.reference, fps=args.fps)
    files["record"] = write_record(args, files["mp4"], args.prompt, args.reference, args.seed, args.negative_prompt,
                                   getattr(pipe, "trained_step", None), getattr(pipe, "trained_with_ema", None),
                                   args.eval_references)
    print(f"loaded in {loaded - start:.1f}s, generated {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} "
          f"in {time.perf_counter() - loaded:.1f}s, written at {args.fps} fps")
    for kind, path in files.items():
        print(f"  {kind}: {path}")
    if args.profile:
        profile(args.profile, lambda: pipe(args.reference, args.prompt, negative_prompt=args.negative_prompt,
                                           seed=args.seed, progress=False, **sampling_options(args)))
    return 0


def profile(directory: str, generate) -> None:
    """``generate()`` once more under JAX's profiler (its program is compiled: the trace shows sampling only)."""
    import jax

    began = time.perf_counter()
    with jax.profiler.trace(str(directory)):
        jax.block_until_ready(generate())
    print(f"profiled one more generation ({time.perf_counter() - began:.1f}s under the profiler) into {directory} "
          f"(tensorboard --logdir {directory}: Profile tab)")


def model_options(pipe, args) -> dict:
    """The options only some models take (a Wan folder's last frame, a two-expert folder's second guidance scale
    and LoRAs), as pipeline keywords; ValueError when the model does not take one that was given."""
    options = {}
    if args.last_frame is not None:
        if not (pipe.takes_reference and getattr(pipe, "takes_last_frame", False)):
            raise ValueError(f"{args.model} takes no --last-frame (Wan image-to-video folders do)")
        options["last_image"] = args.last_frame
    two_experts = getattr(pipe, "has_two_experts", False)
    if args.guidance_scale_2 is not None:  # (--lora-2 on one denoiser is refused as the model loads)
        if not two_experts:
            raise ValueError(f"{args.model} has one denoiser: --guidance-scale-2 is for two-expert Wan 2.2 folders "
                             "(A14B)")
        options["guidance_scale_2"] = args.guidance_scale_2
    return options


def sampling_options(args) -> dict:
    """The pipeline keywords every video of a run shares."""
    return dict(guidance_scale=args.guidance_scale, reference_guidance_scale=args.reference_guidance_scale,
                reference_guidance_start=args.reference_guidance_start, num_inference_steps=args.steps,
                num_frames=args.frames, height=args.height, width=args.width, eta=args.eta, sampler=args.sampler,
                **args.model_options)


def batch_size_error(pipe, args, items) -> str | None:
    """Set ``args.batch_size`` (default: the data-parallel mesh's size, else 1); what is wrong with it, if anything."""
    batched = getattr(pipe, "samples_batches", False)  # not the Wan pipelines: one video per loop
    # the UNet pipeline's rules split a batch over the data axis; the DiT ones keep the batch whole
    splits = batched and pipe.mesh is not None and dict(pipe.rules).get("batch") == "data"
    data = pipe.mesh.shape["data"] if splits else 1
    if args.batch_size is None:
        args.batch_size = data
    if args.batch_size > 1 and not batched:
        return f"--batch-size is for the UNet models and S2V runs; {args.model} samples one video per loop"
    if args.batch_size > 1 and items is None:
        return "--batch-size is for sets of videos (--prompts)" + (f"; --mesh {args.mesh} splits a batch of videos "
                                                                  "over the devices" if data > 1 else "")
    if args.batch_size % data:
        return f"--batch-size {args.batch_size} is not a multiple of the mesh's data axis ({data})"
    return None


def parse_lora_argument(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (FILE, SCALE)."""
    path, _, scale = spec.rpartition(":")
    if path and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def generate_set(pipe, items, args, load_seconds: float) -> int:
    """Every item of a prompt set into ``args.out``: videos, records and ``manifest.jsonl`` (started anew by each
    run; after each batch, the lines of the items done so far in the set's order, so that it lists what exists if
    the run stops). Items whose record exists are kept unless ``--overwrite`` (``kept_record_error`` has checked that
    their records are this run's); the others are sampled
    ``args.batch_size`` at a time (the last batch padded with copies of its last item, so that one compiled program
    serves the whole set). An unreadable reference image stops the run (the images are the user's own inputs)."""
    from tqdm.auto import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [item for item in items if args.overwrite or not (out / f"{item.name}.json").is_file()]
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
    manifest, seconds, listed = out / "manifest.jsonl", 0.0, 0
    finished = {item.name for item in items} - {item.name for item in todo}  # kept: their records exist
    with open(manifest, "w") as lines, tqdm(total=len(todo), desc="generating", unit="video") as bar:
        for batch in [[]] + batches:  # the empty batch lists the kept items before the first new one
            began = time.perf_counter()
            if batch:
                _generate_batch(pipe, batch, args, out)
            seconds += time.perf_counter() - began
            bar.update(len(batch))
            finished.update(item.name for item in batch)
            while listed < len(items) and items[listed].name in finished:
                # the record as one line (written whole by write_record, so a kept one is never half a record)
                lines.write(json.dumps(json.loads((out / f"{items[listed].name}.json").read_text())) + "\n")
                listed += 1
            lines.flush()
    made, kept = len(todo), len(items) - len(todo)
    rate = f", {seconds / made:.1f}s per video" if made else ""
    print(f"loaded in {load_seconds:.1f}s; generated {made} videos{rate} ({args.batch_size} per batch), kept {kept} "
          f"already in {out}")
    print(f"  manifest: {manifest}")
    if args.profile:  # the last batch sampled (the set's last item, compiled first, if all were kept)
        last = batches[-1] if batches else items[-1:]
        if not batches:
            _sample_batch(pipe, last, args)
        profile(args.profile, lambda: _sample_batch(pipe, last, args))
    return 0


def _item_inputs(batch, args) -> tuple[list, list]:
    """(reference, negative prompt) of each item: its own, else the command's."""
    return ([item.reference or args.reference for item in batch],
            [args.negative_prompt if item.negative_prompt is None else item.negative_prompt for item in batch])


def _sample_batch(pipe, batch, args) -> list:
    """Some items of a set, sampled together (one at a time on a pipeline without batches): their videos."""
    references, negatives = _item_inputs(batch, args)
    if args.batch_size == 1:
        return [pipe(references[0], batch[0].prompt, negative_prompt=negatives[0], seed=batch[0].seed,
                     progress=False, **sampling_options(args))]
    padding = args.batch_size - len(batch)  # copies of the last item, dropped after sampling
    return pipe.generate_videos(
        None if not pipe.takes_reference else references + references[-1:] * padding,
        [item.prompt for item in batch] + [batch[-1].prompt] * padding,
        negative_prompts=negatives + negatives[-1:] * padding,
        seeds=[item.seed for item in batch] + [batch[-1].seed] * padding, **sampling_options(args))


def _generate_batch(pipe, batch, args, out: Path) -> None:
    """``_sample_batch``, its videos saved with records."""
    videos = _sample_batch(pipe, batch, args)
    for item, reference, negative, frames in zip(batch, *_item_inputs(batch, args), videos):
        files = pipe.save(frames, out, item.name, reference=reference, fps=args.fps)
        write_record(args, files["mp4"], item.prompt, reference, item.seed, negative,
                     getattr(pipe, "trained_step", None), getattr(pipe, "trained_with_ema", None),
                     item.references or args.eval_references)


def input_image_error(args, items) -> str | None:
    """What is wrong with the images given to the model (``--reference``, each --prompts record's "reference",
    ``--last-frame``), or with a record's evaluation "references", if anything: each file read once (``open_image``),
    before the model loads (minutes for a big one) rather than when a video first needs it (or ``jaxvc eval`` reads
    the record); a record's bad image names the record."""
    from jaxvc.pipeline import open_image

    images = [(args.last_frame, "--last-frame image", "")]
    if items is None:
        images.append((args.reference, "reference image", ""))
    else:  # a record's own reference, else --reference (its default); its evaluation "references" too
        images += [(item.reference, "reference image", f" (the \"reference\" of {item.source or item.name})")
                   if item.reference else (args.reference, "reference image", "") for item in items]
        images += [(image, "evaluation reference image", f" (the \"references\" of {item.source or item.name})")
                   for item in items for image in item.references]
    checked = set()
    for path, what, where in images:
        if path is None or path in checked:
            continue
        checked.add(path)
        try:
            open_image(path, what)
        except (FileNotFoundError, ValueError) as error:
            return f"{error}{where}"
    return None


def record_expectations(item, args, pipe=None) -> dict:
    """What ``item``'s record must say for a kept video to be the one this run would make: its inputs and the
    settings that change the video (and "references" and "fps", which ``jaxvc eval`` reads with it). Before the
    model loads (``pipe`` None) only what the command itself fixes; after, the model's defaults too, as recorded."""
    reference = item.reference or args.reference
    negative = args.negative_prompt if item.negative_prompt is None else item.negative_prompt
    wanted = {"prompt": item.prompt, "seed": item.seed,
              "reference": None if reference is None else str(Path(reference).resolve()),
              "references": [str(Path(image).resolve()) for image in item.references or args.eval_references],
              "model": args.model, "motion_adapter": args.motion_adapter, "unet_weights": args.unet_weights,
              "lora": list(args.lora), "lora_2": list(args.lora_2),
              "reference_guidance_scale": args.reference_guidance_scale,
              "reference_guidance_start": args.reference_guidance_start,
              "last_frame": None if args.last_frame is None else str(Path(args.last_frame).resolve())}
    settings = {"negative_prompt": negative, "steps": args.steps, "guidance_scale": args.guidance_scale,
                "eta": args.eta, "frames": args.frames, "height": args.height, "width": args.width, "fps": args.fps}
    if pipe is None:  # a flag left out is the model's: unknown until it loads
        settings.update(sampler=args.sampler, dtype=args.dtype, guidance_scale_2=args.guidance_scale_2)
        return {**wanted, **{key: value for key, value in settings.items() if value is not None}}
    return {**wanted, **settings, "sampler": args.used["sampler"], "dtype": args.used["dtype"],
            "guidance_scale_2": args.used["guidance_scale_2"], "trained_step": getattr(pipe, "trained_step", None),
            "ema": getattr(pipe, "trained_with_ema", None)}


def kept_record_error(items, args, pipe=None) -> str | None:
    """With ``--prompts`` and without ``--overwrite``: the first record in ``--out`` that the run would keep but that
    another prompt, seed, reference or setting made (a .txt set's items are named by line: an edited line, or
    another --seed, would otherwise keep the old video and list it in the manifest), as one line naming the file
    and each differing key, old -> new; None when every existing record is this run's."""
    if items is None or args.overwrite:
        return None
    out, wrong, first = Path(args.out), 0, None
    for item in items:
        path = out / f"{item.name}.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            record = f"not a readable record ({' '.join(str(error).split())})"
        if isinstance(record, dict):
            record.setdefault("references", [])  # write_record leaves it out when there are none
            # a key a record lacks (written by an older jaxvc) is not compared: only the keys it has
            wanted = record_expectations(item, args, pipe)
            differ = [f"{key} {record[key]!r} -> {value!r}" for key, value in wanted.items()
                      if key in record and not _same(key, record[key], value)]
        else:
            differ = [record if isinstance(record, str) else "not a record"]
        if differ:
            wrong += 1
            first = first or f"{path}: {', '.join(differ)}"
    if not wrong:
        return None
    more = f" (and {wrong - 1} more of the set's records)" if wrong > 1 else ""
    return (f"{first}{more}: already in --out from another run; pass --overwrite to make it again, or another --out "
            "(this run keeps only the videos made with its own prompt, seed, references and settings)")


def _same(key: str, old, new) -> bool:
    """A record's value and this run's: equal (a model folder: also when named by another path to it)."""
    if old == new:
        return True
    return key == "model" and isinstance(old, str) and Path(old).resolve() == Path(new).resolve()


def evaluation_images(paths) -> list[str]:
    """``--eval-references``: image files and folders -> the image files (a folder's sorted by name), absolute."""
    from jaxvc.data.media import is_image

    images = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_image(p.name))
            if not found:
                raise FileNotFoundError(f"{path}: a folder without images")
            images += [str(p.resolve()) for p in found]
        elif path.is_file() and is_image(path.name):
            images.append(str(path.resolve()))
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    return images


def write_record(args, video: Path, prompt: str, reference, seed: int, negative_prompt: str,
                 trained_step: int | None = None, ema: bool | None = None, references=()) -> Path:
    """``<name>.json`` beside the video: what made it, and what ``jaxvc eval`` reads (video, prompt, reference;
    ``references``, images of the subject to score against, when given). Its settings are those that ran, the
    model's where the command left them out (``args.used``: sampler, dtype, attention backend, a two-expert
    folder's second guidance scale), so that the record alone reproduces the video."""
    reference = None if reference is None else str(Path(reference).resolve())
    record = {"video": video.name, "prompt": prompt, "reference": reference, "lora": list(args.lora),
              "negative_prompt": negative_prompt, "model": args.model, "motion_adapter": args.motion_adapter,
              "unet_weights": args.unet_weights,
              "guidance_scale": args.guidance_scale, "reference_guidance_scale": args.reference_guidance_scale,
              "reference_guidance_start": args.reference_guidance_start, "steps": args.steps,
              "sampler": args.used["sampler"], "eta": args.eta, "lora_2": list(args.lora_2),
              "guidance_scale_2": args.used["guidance_scale_2"],
              "last_frame": None if args.last_frame is None else str(Path(args.last_frame).resolve()),
              "seed": seed, "frames": args.frames, "height": args.height, "width": args.width, "fps": args.fps,
              "dtype": args.used["dtype"], "attention_backend": args.used["attention_backend"], "mesh": args.mesh,
              "trained_step": trained_step,
              "ema": ema}
    if references:  # jaxvc eval scores CLIP-I / DINO-I against these instead of "reference"
        record["references"] = [str(Path(image).resolve()) for image in references]
    path = video.with_suffix(".json")
    tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: a record on disk is never half a record
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path
