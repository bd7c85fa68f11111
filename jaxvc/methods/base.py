"""What a training method gives the trainer (``jaxvc/train``): the contract every file in ``methods/`` implements.

A method owns its model(s), says which parameter paths train, and computes its loss. The trainer owns everything
else: sharding, the optimizer (built only over the trainable subset), accumulation, checkpoints, the loop.

Parameters are one pytree ``{"params": ...}`` as returned by Flax ``init`` (unboxed). Batches are dicts of arrays
whose first axis is the (per-step global) batch; the trainer shards that axis over ``("data", "fsdp")``.
"""
from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
from flax import linen as nn

PyTree = Any


class Method(abc.ABC):
    """Base class for a trainable method."""

    name: str = "method"
    # False when ``init_params`` reads weight files (not traceable): the trainer then calls it eagerly and places
    # the host arrays onto their shardings instead of jitting it with ``out_shardings``.
    init_params_jittable: bool = True
    # Optional hook, looked up by the trainer: ``sample(self, params, rng) -> {name: (N, F, H, W, 3) videos in
    # [-1, 1]}``; called every ``config.sample_every`` steps on the (EMA if any) full parameter tree under jit.

    @abc.abstractmethod
    def abstract_params(self) -> PyTree:
        """``jax.eval_shape`` of the parameter init: ShapeDtypeStructs, boxed with logical axis names."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> PyTree:
        """Concrete (unboxed) parameters: random init, or weights loaded from the config's pretrained paths.

        The trainer calls this under ``jax.jit`` with ``out_shardings`` so large models are created directly
        in their shardings; implementations that load files return host arrays and the trainer places them.
        """

    @abc.abstractmethod
    def trainable(self, path: tuple[str, ...]) -> bool:
        """Whether the parameter at this Flax path (e.g. ``("params", "down_blocks_0", ..., "kernel")``) trains."""

    @abc.abstractmethod
    def loss(self, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar loss for one (micro-)batch and a dict of scalar metrics to log. Pure and jittable."""

    def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one batch (for compile-only planning and abstract lowering)."""
        raise NotImplementedError(f"method '{self.name}' does not describe its batch")

    def trainable_mask(self, params: PyTree) -> PyTree:
        """Tree of bools, same structure as ``params``."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: self.trainable(tuple(_key_name(k) for k in path)), nn.unbox(params))


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
