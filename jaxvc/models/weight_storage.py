"""Weights kept in a narrower dtype than float32 where that changes nothing but their memory.

A layer that computes in bf16 casts its float32 kernel to bf16 before using it, so a kernel stored in bf16 gives
bit for bit the same output at half the memory: what ``torch_dtype=torch.bfloat16`` buys diffusers users, without
its rounding of the parts that compute in float32. ``store_weights`` rounds the floating leaves of 2+ dimensions
(kernels, embedding tables: all but a fraction of a percent of a model's bytes) and leaves as they are

* 1-D leaves (norm scales, biases): norms run in float32, and they are few;
* leaves under a module that computes in float32 whatever the compute dtype (``KEEP_FLOAT32``, as diffusers'
  ``_keep_in_fp32_modules``): the Wan DiT's timestep MLP and modulation tables (``_modulation`` adds them in
  float32), the position table of its image tokens, T5's relative position bias.

Used for frozen weights in training (``config.frozen_dtype``, ``jaxvc/train/state.py``) and for the weights of the
parts of a generation pipeline that compute in the pipeline's dtype (``jaxvc generate --dtype bfloat16``).
``tests/test_weight_storage.py`` and ``tests/test_frozen_dtype.py`` check that the outputs are unchanged.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

KEEP_FLOAT32 = frozenset({
    "time_embedder",  # Wan: the timestep MLP runs in float32 (jaxvc/models/wan.py, ConditionEmbedder)
    "scale_shift_table",  # Wan: modulation tables, added to the time projection in float32
    "relative_attention_bias",  # T5: the position bias is looked up and added in float32
    "pos_embed",  # Wan FLF2V: the image tokens' position table, added in the image tokens' dtype (float32)
})


def _kept(path: tuple, leaf, dtype, keep: frozenset) -> bool:
    return (np.ndim(leaf) < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == dtype
            or any(str(part) in keep for part in path))


def _stored(leaf, dtype):
    if isinstance(leaf, jax.ShapeDtypeStruct):  # an abstract tree (plans, memory tables): its shardings kept
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return leaf.astype(dtype)


def store_weights(tree: dict, dtype: Any | None, keep: frozenset = KEEP_FLOAT32) -> dict:
    """``tree`` (a nested dict) with its floating matrices (2+ dims) outside ``keep`` in ``dtype``; ``None``:
    ``tree`` itself.

    Host (numpy) leaves are rounded on the host, so the devices never hold them in float32; device arrays and
    tracers (inside ``jit``) with ``astype``; ShapeDtypeStructs become ones of ``dtype``."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    return traverse_util.unflatten_dict({path: leaf if _kept(path, leaf, dtype, keep) else _stored(leaf, dtype)
                                         for path, leaf in flat.items()})
