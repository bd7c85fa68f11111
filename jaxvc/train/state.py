"""The train state: trainable and frozen parameters kept apart, optimizer state over the trainable part only.

Splitting the parameter tree by the method's ``trainable(path)`` into two nested dicts is what makes frozen weights
cost nothing beyond their storage: the optimizer is initialized on the trainable dict (no moments, not even zeros,
for frozen weights) and the step differentiates with respect to the trainable dict only.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax import linen as nn

from jaxvc.models.weight_storage import store_weights

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed (skipped non-finite steps included), the data position
    opt_steps: jax.Array  # int32: optimizer updates applied (the LR schedule's clock)
    params: PyTree  # the trainable parameters only
    frozen: PyTree  # the frozen parameters
    opt_state: PyTree  # optimizer state over ``params``
    rng: jax.Array  # uint32[2] base key; the step's key is fold_in(rng, step)
    ema: PyTree | None  # exponential moving average of ``params``, or None
    nonfinite_in_a_row: jax.Array  # int32: consecutive skipped steps
    nonfinite_total: jax.Array  # int32: skipped steps over the whole run

    def full_params(self, use_ema: bool = False) -> PyTree:
        """The method's parameter tree (trainable merged with frozen), with the EMA weights if asked and present."""
        trainable = self.ema if (use_ema and self.ema is not None) else self.params
        return merge_params(trainable, self.frozen)


def unbox(tree: PyTree) -> PyTree:
    """Strip ``nn.LogicallyPartitioned`` boxes (works on abstract trees too, without applying constraints)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def split_params(params: PyTree, is_trainable: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding complementary leaves of ``params``."""
    flat = traverse_util.flatten_dict(params)
    trainable = {path: value for path, value in flat.items() if is_trainable(tuple(str(p) for p in path))}
    frozen = {path: value for path, value in flat.items() if path not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of ``split_params``."""
    flat = dict(traverse_util.flatten_dict(frozen))
    for path, value in traverse_util.flatten_dict(trainable).items():
        if path in flat:
            raise ValueError(f"parameter {'/'.join(path)} is both trainable and frozen")
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def count_params(tree: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a tree's array leaves (ShapeDtypeStructs too)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def new_state(trainable: PyTree, frozen: PyTree, optimizer, rng: jax.Array, use_ema: bool,
              frozen_dtype: Any | None = None) -> TrainState:
    """A fresh state at step 0 (pure; jitted by the trainer with output shardings). ``frozen_dtype``: the dtype
    the frozen matrices are kept in (``jaxvc/models/weight_storage.py``; ``None``: as they come)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, opt_steps=zero, params=trainable, frozen=store_weights(frozen, frozen_dtype),
                      opt_state=optimizer.init(trainable), rng=rng,
                      ema=jax.tree.map(jnp.copy, trainable) if use_ema else None,
                      nonfinite_in_a_row=zero, nonfinite_total=zero)


def state_to_tree(state: TrainState, include_frozen: bool = True) -> dict:
    """A plain dict for Orbax (None fields left out)."""
    tree = {"step": state.step, "opt_steps": state.opt_steps, "params": state.params,
            "opt_state": state.opt_state, "rng": state.rng, "nonfinite_in_a_row": state.nonfinite_in_a_row,
            "nonfinite_total": state.nonfinite_total}
    if include_frozen:
        tree["frozen"] = state.frozen
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


def state_from_tree(tree: dict, frozen: PyTree | None = None) -> TrainState:
    """Inverse of ``state_to_tree``; ``frozen`` supplies the frozen weights when the tree has none."""
    if "frozen" not in tree and frozen is None:
        raise ValueError("checkpointed state holds no frozen parameters and none were supplied")
    return TrainState(step=tree["step"], opt_steps=tree["opt_steps"], params=tree["params"],
                      frozen=tree.get("frozen", frozen), opt_state=tree["opt_state"], rng=tree["rng"],
                      ema=tree.get("ema"), nonfinite_in_a_row=tree["nonfinite_in_a_row"],
                      nonfinite_total=tree["nonfinite_total"])
