"""The ``jaxvc`` command. Each subcommand lives beside the code it drives and is imported only when used.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep the help here so `jaxvc --help` needs no heavy imports.
COMMANDS = {
    "demo": ("jaxvc.demo", "train a tiny reference-injected video model on the synthetic world, generate, evaluate"),
    "train": ("jaxvc.train.cli", "train a method from a config file (configs/<method>.py:<variant>)"),
    "generate": ("jaxvc.generate", "generate a video of a reference subject (or text-to-video) following a text "
                 "prompt"),
    "eval": ("jaxvc.eval.cli", "score generated videos: CLIP-T/I, DINO-I, T.Cons, dynamic degree, motion smoothness, "
                               "face similarity, FVD/KVD, UCF-101 Inception Score"),
    "convert": ("jaxvc.convert.cli",
                "convert a diffusers pipeline folder / motion module into a jaxvc Orbax checkpoint"),
    "export-lora": ("jaxvc.convert.export_lora",
                    "write a run's LoRA adapters and learnt tokens as diffusers files (load_lora_weights)"),
    "export-diffusers": ("jaxvc.convert.export_diffusers",
                         "write a run's UNet as diffusers UNetMotionModel and MotionAdapter folders (from_pretrained)"),
    "motion-bins": ("jaxvc.eval.motion_bins_cli", "split real clips by foreground flow into method (e)'s FVD bins"),
    "pack": ("jaxvc.data.pack", "pack a folder or JSONL manifest of images/videos/captions into ArrayRecord shards"),
    "bench": ("jaxvc.bench.cli", "time the VideoMaker train step, sampling and VAE decode: jaxvc vs diffusers PyTorch"),
    "sweep": ("jaxvc.sweep.cli", "scaling study: a grid of training runs -> results table, scaling fits, plots"),
    "plan": ("jaxvc.plan.cli",
             "compile the sharded train step for a TPU slice or GPU cluster on CPU: memory, FLOPs, collectives"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxvc", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, unless the help already says what the default is, or there is none
    to show (None, False, empty: the help says what happens then); "(default: None)" after "default: the
    config's" only contradicted it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or (
                isinstance(default, (str, tuple, list)) and not default):
            return text
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command '{argv[0]}' (choose from {', '.join(COMMANDS)})")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"jaxvc {name}", description=help_text, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
