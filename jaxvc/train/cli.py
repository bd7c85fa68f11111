"""``jaxvc train --config configs/<method>.py:<variant> [--config.a.b=value ...] [--workdir DIR]``.

Multi-host runs start one copy per host with ``--distributed=auto`` (TPU pods, SLURM) or with
``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables). Running the same command again resumes from the
latest checkpoint in the workdir; a config that does not fit the checkpoint (its state layout or data position) is
one line naming the changed keys, exit 2 (jaxvc/train/config_changes.py).

The data stream is picked by ``config.data.source`` from ``DATA_SOURCES`` (``"module:function"``, called as
``function(config, rows)`` with this host's rows ``[start, stop)`` of the global batch; it returns an iterator of
numpy batch dicts with ``get_state``/``set_state``). Sources listed in ``DATA_STREAMS`` are opened and checked
first (spec, folder there, records in it), before the method loads its weights: a mistake in the data is reported
in seconds, as one line naming the config key, and exits 2, as a bad config or override does.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

from jaxvc.config_utils import ConfigError, accept_config_overrides, apply_overrides, load_config

DATA_SOURCES: dict[str, str] = {
    "toy": "jaxvc.train.toy_data:from_config",
    "synthetic": "jaxvc.data.training_streams:from_config",
    "packed": "jaxvc.data.training_streams:from_config",
    "grain": "jaxvc.data.build:from_config",  # generic stream specs (config.data.streams), see jaxvc/data/build.py
}
# source -> "module:function" that opens config.data's streams ({name: random-access source}; called as
# ``function(config)``, a bad spec or a missing or empty source raised as a ConfigError naming the key); the
# DATA_SOURCES function then takes them as ``streams=``, so each folder is scanned once
DATA_STREAMS: dict[str, str] = {
    "synthetic": "jaxvc.data.training_streams:streams_from_config",
    "packed": "jaxvc.data.training_streams:streams_from_config",
    "grain": "jaxvc.data.build:streams_from_config",
}
# config.model keys that name local weight files or folders when set
MODEL_PATH_KEYS = ("pretrained", "motion_adapter", "transformer", "text_encoder", "tokenizer", "vae")


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


def _data_source(config) -> str:
    source = config.data.get("source", "toy") if "data" in config else "toy"
    if source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source '{source}' is not one of {', '.join(sorted(DATA_SOURCES))}")
    return source


def _function(spec: str):
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def open_streams(config):
    """The streams of ``config.data.source`` opened and checked (``DATA_STREAMS``), or None for a source that opens
    its own (toy). Raises ConfigError (DataSourceError) naming the key for a bad spec or a missing or empty source."""
    source = _data_source(config)
    return _function(DATA_STREAMS[source])(config) if source in DATA_STREAMS else None


def build_data(config, rows: tuple[int, int], tokenizer=None, streams=None):
    """The data iterator named by ``config.data.source`` for this host's rows. ``tokenizer``: the method's (its
    captions must be encoded as the method reads them, e.g. with textual inversion's added tokens); sources that take
    a ``tokenizer`` argument get it. ``streams``: from ``open_streams(config)``, for sources that take them."""
    function = _function(DATA_SOURCES[_data_source(config)])
    parameters = inspect.signature(function).parameters
    options = {}
    if tokenizer is not None and "tokenizer" in parameters:
        options["tokenizer"] = tokenizer
    if streams is not None and "streams" in parameters:
        options["streams"] = streams
    return function(config, rows, **options)


def _load_config(args):
    try:
        config = load_config(args.config)
    except ConfigError:
        raise
    except ValueError as err:
        # config files refuse a variant they do not have with ValueError("<file>: unknown variant ..."): a mistake
        # on the command line. Any other ValueError from a config file is a bug in it and keeps its traceback.
        if "unknown variant" not in str(err):
            raise
        raise ConfigError(str(err)) from None
    return apply_overrides(config, getattr(args, "config_overrides", ()))


def check_model_paths(config) -> None:
    """The local weight files and folders config.model names exist (else a ConfigError naming the key): checked
    before the data and the model, which would report them as a traceback."""
    model = config.get("model")
    for key in MODEL_PATH_KEYS if model is not None else ():
        value = model.get(key)
        if isinstance(value, str) and value and "://" not in value and not os.path.exists(value):
            raise ConfigError(f"config.model.{key} = {value!r}: no such file or folder")


def run(args) -> int:
    from jaxvc.train import distributed

    if args.distributed != "off":
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               auto=args.distributed == "auto")
    try:
        config = _load_config(args)
    except ConfigError as err:
        print(f"jaxvc train: {err}", file=sys.stderr)
        return 2
    workdir = args.workdir or config.get("workdir")
    if not workdir:
        print("jaxvc train: no run folder: pass --workdir or set config.workdir", file=sys.stderr)
        return 2
    try:  # the user's files and folders, before the minutes of loading weights
        check_model_paths(config)
        streams = open_streams(config)
    except ConfigError as err:
        print(f"jaxvc train: {err}", file=sys.stderr)
        return 2

    from jaxvc.convert.pipeline import PipelineFolderError
    from jaxvc.methods import build_method
    from jaxvc.train.config_changes import ResumeMismatchError
    from jaxvc.train.loop import NonFiniteError, Trainer

    try:
        method = build_method(config)
    except (ConfigError, FileNotFoundError) as err:  # a setting refused, a weight or tokenizer file not there
        print(f"jaxvc train: {err}", file=sys.stderr)
        return 2
    except PipelineFolderError as err:  # a weights folder without a part it needs (the message starts with its path)
        pretrained = str(config.model.get("pretrained") or "")
        key = f"config.model.pretrained = {pretrained!r}: " if pretrained and str(err).startswith(pretrained) else ""
        print(f"jaxvc train: {key}{err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(config, method, workdir)
    except ConfigError as err:  # the batch sizes against the mesh and accumulation
        print(f"jaxvc train: {err}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit(lambda rows: build_data(config, rows, getattr(method, "tokenizer", None), streams))
    except NonFiniteError as err:
        print(f"jaxvc train: stopped: {err}", file=sys.stderr)
        return 3
    except ResumeMismatchError as err:  # a config that does not fit the workdir's checkpoint (names the keys)
        print(f"jaxvc train: {err}", file=sys.stderr)
        return 2
    if result.preempted:
        print(f"jaxvc train: stopped at step {result.final_step} on SIGTERM; rerun the same command to resume")
    else:
        print(f"jaxvc train: done, step {result.final_step}; checkpoints in {trainer.checkpointer.directory}")
    return 0
