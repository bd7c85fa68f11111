"""A finished (or running) training run as a model: its config, its method and the parameters of one checkpoint.

A run folder is what ``jaxvc train --workdir DIR`` writes (``jaxvc demo --out OUT`` trains in ``OUT/run``):
``config.json`` and ``checkpoints/<step>/``. Each checkpoint is rebuilt with the config saved with it (a resume
rewrites config.json with its own settings, e.g. other validation or ``model`` options; the checkpoints saved
before it keep theirs), and with config.json for checkpoints saved without one. Restoring goes through the
``Trainer`` the run was made with, so whatever it handles (frozen weights kept out of the checkpoint and re-read from
``config.model.pretrained``, a different device count, EMA) is handled here the same way. ``jaxvc generate --model
DIR`` uses this.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from jaxvc.storage import run_path


class RunFolderError(FileNotFoundError):
    """A folder that is not a training run, or a run without the checkpoint asked for."""


@dataclass
class TrainedRun:
    config: Any  # ml_collections.ConfigDict the checkpoint at ``step`` was saved with (plus the overrides given here)
    method: Any
    params: Any  # the method's full parameter tree at ``step`` (EMA weights where the run keeps them and asked)
    step: int
    used_ema: bool

    @property
    def sampling(self) -> dict:
        """How the run samples unless told otherwise (``jaxvc generate``'s defaults): its validation settings
        (``config.validation``: steps, guidance scale, DDIM eta, sampler), the method's published inference
        settings unless the run changed them."""
        from jaxvc.methods.base import validation_sampling

        return validation_sampling(self.config.get("validation"))


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder (local, or a bucket URL such as gs://bucket/run) with config.json and checkpoints/."""
    path = run_path(path)
    return (path / "config.json").exists() and (path / "checkpoints").is_dir()


def load_trained_run(workdir: str | os.PathLike, *, step: int | None = None, use_ema: bool = True,
                     overrides: Mapping[str, str] | None = None) -> TrainedRun:
    """The run in ``workdir`` at checkpoint ``step`` (default: the latest).

    ``overrides``: config overrides as on the command line, applied before the method is built, e.g.
    ``{"compute_dtype": "bfloat16", "model.attention_backend": "cudnn"}`` (inference settings; shapes of parameters
    must not change).
    """
    from jaxvc.config_utils import apply_overrides, config_from_dict
    from jaxvc.methods import build_method
    from jaxvc.train.checkpoint import Checkpointer
    from jaxvc.train.loop import Trainer

    workdir = run_path(workdir)
    if not is_run_folder(workdir):
        raise RunFolderError(f"{workdir}: not a training run folder (expected config.json and checkpoints/, as "
                             "`jaxvc train --workdir` writes)")
    try:
        run_config = json.loads((workdir / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{workdir / 'config.json'}: not valid JSON ({error})") from error
    # config.json is the latest (re)start's config: a checkpoint from before a resume that changed settings is
    # rebuilt with the config saved with it (a small JSON item read alone), then its state is restored once.
    checkpointer = Checkpointer(workdir / "checkpoints", run_config.get("checkpoint") or {})
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise RunFolderError(f"{workdir / 'checkpoints'}: the run has no checkpoint yet")
        if step is not None and step not in steps:
            raise RunFolderError(f"{workdir / 'checkpoints'}: no checkpoint at step {step} (there are "
                                 f"{sorted(steps)})")
        step = max(steps) if step is None else step
        config = config_from_dict(checkpointer.saved_config(step) or run_config)  # older checkpoints: config.json
    finally:
        checkpointer.close()
    apply_overrides(config, (overrides or {}).items())
    method = build_method(config)
    state, _, _ = Trainer(config, method, workdir).restore(step)
    used_ema = use_ema and state.ema is not None
    return TrainedRun(config, method, state.full_params(use_ema=used_ema), int(state.step), used_ema)
