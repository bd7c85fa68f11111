"""``jaxvc convert``: a diffusers pipeline folder (+ motion adapter) -> a jaxvc Orbax checkpoint that loads fast."""
from __future__ import annotations

import argparse
import time

from jaxvc.convert.pipeline import load_diffusers_pipeline, save_converted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, "
                                         "tokenizer/, scheduler/)")
    parser.add_argument("output", help="directory to write the jaxvc checkpoint to (must not exist)")
    parser.add_argument("--motion-adapter", default=None,
                        help="diffusers MotionAdapter folder, or an original AnimateDiff motion-module file "
                             "(mm_sd_v15_v2.safetensors / .ckpt); not needed if unet/ is a UNetMotionModel")
    parser.add_argument("--variant", default=None, help="weight-file variant to read, e.g. fp16")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled .ckpt/.bin files (they can run code when loaded; only for trusted files)")
    parser.add_argument("--per-frame-motion-norm", action="store_true",
                        help="motion-module GroupNorm per frame (original AnimateDiff) instead of across frames "
                             "(diffusers, the default)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")


def run(args) -> int:
    start = time.perf_counter()
    overrides = {"norm_over_frames": False} if args.per_frame_motion_norm else {}
    weights = load_diffusers_pipeline(args.pipeline, motion_adapter=args.motion_adapter, variant=args.variant,
                                      allow_pickle=args.allow_pickle, **overrides)
    out = save_converted(weights, args.output, overwrite=args.overwrite)
    motion = weights.unet_config.motion
    print(f"converted {args.pipeline} -> {out} in {time.perf_counter() - start:.1f}s "
          f"(UNet levels {weights.unet_config.block_out_channels}, motion modules: "
          f"{'none' if motion is None else f'max_len {motion.max_seq_length}, mid block {motion.use_mid_block}'})")
    return 0
