"""``jaxvc train --config configs/<method>.py:<variant> [--config.a.b=value ...] [--workdir DIR]``.

Multi-host runs start one copy per host with ``--distributed=auto`` (TPU pods, SLURM) or with
``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables). Running the same command again resumes from the
latest checkpoint in the workdir.

The data stream is picked by ``config.data.source`` from ``DATA_SOURCES`` (``"module:function"``, called as
``function(config, rows)`` with this host's rows ``[start, stop)`` of the global batch; it returns an iterator of
numpy batch dicts with ``get_state``/``set_state``).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from jaxvc.config_utils import ConfigError, accept_config_overrides, apply_overrides, load_config

DATA_SOURCES: dict[str, str] = {
    "toy": "jaxvc.train.toy_data:from_config",
    "synthetic": "jaxvc.data.training_streams:from_config",
    "packed": "jaxvc.data.training_streams:from_config",
    "grain": "jaxvc.data.build:from_config",  # generic stream specs (config.data.streams), see jaxvc/data/build.py
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.py[:VARIANT]",
                        help="config file and variant, e.g. configs/toy.py:tiny; override fields with "
                             "--config.<key>=<value> (e.g. --config.optim.lr=1e-4)")
    parser.add_argument("--workdir", default=None, help="run folder (checkpoints, TensorBoard, config.json); "
                                                        "defaults to config.workdir")
    parser.add_argument("--distributed", choices=("off", "auto", "env"), default="env",
                        help="auto: let JAX find the cluster (TPU pods, SLURM); env: use the flags below or the "
                             "JAX_* environment variables if set; off: single process")
    parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    parser.add_argument("--num_processes", type=int, default=None, help="number of processes (hosts) in the job")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index, 0 .. num_processes - 1")
    accept_config_overrides(parser)


def build_data(config, rows: tuple[int, int], tokenizer=None):
    """The data iterator named by ``config.data.source`` for this host's rows. ``tokenizer``: the method's (its
    captions must be encoded as the method reads them, e.g. with textual inversion's added tokens); sources that take
    a ``tokenizer`` argument get it."""
    source = config.data.get("source", "toy") if "data" in config else "toy"
    if source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source '{source}' is not one of {', '.join(sorted(DATA_SOURCES))}")
    module_name, _, attribute = DATA_SOURCES[source].partition(":")
    function = getattr(importlib.import_module(module_name), attribute)
    if tokenizer is not None and "tokenizer" in inspect.signature(function).parameters:
        return function(config, rows, tokenizer=tokenizer)
    return function(config, rows)


def run(args) -> int:
    from jaxvc.train import distributed

    if args.distributed != "off":
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               auto=args.distributed == "auto")
    try:
        config = load_config(args.config)
        apply_overrides(config, getattr(args, "config_overrides", ()))
    except ConfigError as err:
        print(f"jaxvc train: {err}", file=sys.stderr)
        return 2
    workdir = args.workdir or config.get("workdir")
    if not workdir:
        print("jaxvc train: no run folder: pass --workdir or set config.workdir", file=sys.stderr)
        return 2

    from jaxvc.methods import build_method
    from jaxvc.train.loop import NonFiniteError, Trainer

    method = build_method(config)
    trainer = Trainer(config, method, workdir)
    try:
        result = trainer.fit(lambda rows: build_data(config, rows, getattr(method, "tokenizer", None)))
    except NonFiniteError as err:
        print(f"jaxvc train: stopped: {err}", file=sys.stderr)
        return 3
    if result.preempted:
        print(f"jaxvc train: stopped at step {result.final_step} on SIGTERM; rerun the same command to resume")
    else:
        print(f"jaxvc train: done, step {result.final_step}; checkpoints in {trainer.checkpointer.directory}")
    return 0
