"""``jaxvc export-lora RUN OUT``: a training run's LoRA adapters as diffusers files, for PyTorch users.

Writes into the folder OUT:
  pytorch_lora_weights.safetensors   the run's input (LoRA) adapters on the UNet, in diffusers / peft keys with
                                     alpha metadata: ``AnimateDiffPipeline.load_lora_weights(OUT)`` loads them
                                     (Still-Moving's motion adapter, CustomCrafter's SSLM);
  learned_embeds.safetensors         textual inversion's new tokens ``{token: embedding}`` (CustomCrafter):
                                     ``pipe.load_textual_inversion(OUT / "learned_embeds.safetensors")``.
Output adapters (Still-Moving's spatial adapters) follow whole blocks and have no diffusers equivalent: they are
named and left out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="training run folder (`jaxvc train --workdir DIR`)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA weights the run keeps")


def export(run, out: str | os.PathLike) -> dict[str, Path]:
    """Write a loaded ``TrainedRun``'s adapters (``method.exported_adapters``) and tokens (``method.learned_tokens``)
    into ``out``; returns the files written and the output adapters left out (``"skipped"``)."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from jaxvc.convert.lora import save_lora

    method = run.method
    adapters, skipped = method.exported_adapters(run.params) if hasattr(method, "exported_adapters") else ({}, [])
    tokens = method.learned_tokens(run.params) if hasattr(method, "learned_tokens") else {}
    if not adapters and not tokens:
        raise ValueError(f"method '{method.name}' has no LoRA adapters or learnt tokens to export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict = {"skipped": skipped}
    if adapters:
        written["lora"] = save_lora(out / "pytorch_lora_weights.safetensors", adapters)
    if tokens:
        path = out / "learned_embeds.safetensors"
        save_file({name: np.ascontiguousarray(np.asarray(jax.device_get(row), np.float32))
                   for name, row in tokens.items()}, str(path))
        written["tokens"] = path
    return written


def run(args) -> int:
    from jaxvc.train.trained_run import RunFolderError, load_trained_run

    try:
        trained = load_trained_run(args.run, step=args.step, use_ema=not args.no_ema)
        written = export(trained, args.out)
    except (RunFolderError, ValueError) as error:
        print(f"jaxvc export-lora: {error}", file=sys.stderr)
        return 2
    for kind in ("lora", "tokens"):
        if kind in written:
            print(f"  {kind}: {written[kind]}")
    for name in written["skipped"]:
        print(f"  not exported ({name}: an output adapter; diffusers has no equivalent)")
    return 0
