"""Orbax checkpoints of a run: the train state, the data iterator's state and the config, per step.

One ``CheckpointManager`` under ``<workdir>/checkpoints`` with three items: ``state`` (the TrainState as a plain
tree; sharded arrays are written by every host in parallel), ``data`` (the JSON dict from the data iterator's
``get_state()``) and ``config`` (JSON). Saves may be asynchronous (the device-to-host copy happens before ``save``
returns, the writing in the background); a step directory only appears once complete, so a run killed mid-save
resumes from the previous checkpoint. What is kept: the latest ``keep`` steps plus the ``keep_best`` best by a metric.

Restoring takes an abstract state whose leaves carry the *current* run's shardings, so a checkpoint written on one
mesh is read onto another (8 devices -> 4 or 1, a different fsdp/tensor split, another number of hosts).
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from jaxvc.storage import run_path

PyTree = Any
# Replicated arrays are split across their replicas for writing only when each replica's part is at least this big:
# slicing tiny arrays costs a compiled slice per shape and saves nothing.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's PyTree handler with the standard type handlers, jax.Array's tuned as above."""
    try:
        from orbax.checkpoint._src.metadata.array_metadata_store import Store
        metadata_store = Store()
    except ImportError:  # array metadata is optional
        metadata_store = None
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
                                    array_metadata_store=metadata_store)),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _metric_value(metrics, name: str, mode: str) -> float:
    value = float(metrics.get(name, math.nan)) if metrics else math.nan
    if not math.isfinite(value):
        # an unusable metric ranks last
        return math.inf if mode == "min" else -math.inf
    return value


class Checkpointer:
    """Save/restore a run's (state, data state, config) by step."""

    def __init__(self, directory: str | os.PathLike, checkpoint_config):
        self.directory = run_path(directory)  # a local folder or a bucket URL (gs://...), kept whole
        cfg = checkpoint_config
        keep = int(cfg.get("keep", 2))
        keep_best = int(cfg.get("keep_best", 0) or 0)
        self.best_metric = str(cfg.get("best_metric", "loss"))
        self.best_mode = str(cfg.get("best_mode", "min"))
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"checkpoint.best_mode must be 'min' or 'max', got '{self.best_mode}'")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1 (the latest checkpoint is what a resume needs), got {keep}")
        policies = [preservation.LatestN(n=keep)]
        if keep_best > 0:
            name, mode = self.best_metric, self.best_mode
            # BestN keeps the last n after sorting; for "min" sort descending so the smallest come last.
            policies.append(preservation.BestN(get_metric_fn=lambda m: _metric_value(m, name, mode),
                                               reverse=(mode == "min"), n=keep_best,
                                               keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=bool(cfg.get("use_async", True)),
            create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state_tree: PyTree, data_state: dict | None, config: dict,
             metrics: dict | None = None) -> bool:
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state_tree),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  config=ocp.args.JsonSave(config))
        clean_metrics = {k: float(v) for k, v in (metrics or {}).items()}
        if self.best_metric not in clean_metrics:
            clean_metrics[self.best_metric] = math.nan
        return self.manager.save(int(step), args=args, metrics=clean_metrics, force=True)

    def restore(self, step: int, abstract_state_tree: PyTree, with_config: bool = True) -> tuple[PyTree, dict, dict]:
        """(state tree placed per the abstract tree's shardings, data state, config dict) at ``step``.
        ``with_config=False`` for a checkpoint saved without its config (the dict is then empty)."""
        items = dict(state=ocp.args.PyTreeRestore(
            abstract_state_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state_tree)),
            data=ocp.args.JsonRestore())
        if with_config:
            items["config"] = ocp.args.JsonRestore()
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored["state"], restored["data"], restored["config"] if with_config else {}

    def item_metadata(self, step: int) -> dict | None:
        """{item: metadata} of the checkpoint at ``step``, read without the arrays: "state" is the saved tree with
        leaves carrying shape and dtype; an item the checkpoint lacks is absent. None where Orbax cannot say."""
        try:
            metadata = self.manager.item_metadata(int(step))
        except Exception:  # it only explains a failed restore or adapts one: never worth failing a resume over
            return None
        return {name: getattr(value, "tree", value) for name, value in metadata.items()}

    def saved_config(self, step: int) -> dict:
        """The config saved with the checkpoint at ``step``, read alone (a small JSON file, no state); {} for a
        checkpoint saved without one."""
        try:
            restored = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except KeyError:  # Orbax: 'Item "config" was not found in the checkpoint'
            return {}
        return dict(restored["config"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs that carry the target shardings (what Orbax restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
