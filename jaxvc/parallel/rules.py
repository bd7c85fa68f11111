"""The one table that maps logical axis names to mesh axes.

Every parameter in jaxvc carries logical axis names (``nn.with_logical_partitioning``) and activations are
constrained at block boundaries (``nn.with_logical_constraint``). Only this file says which mesh axis a logical
name lives on, so a change of parallelism layout is a change of ``rules`` (usually through the config), never of
a model.

Logical names used by the models:

  parameters:  "embed"      a layer's input/model channel dimension            -> fsdp
               "mlp"        feed-forward hidden / output channels              -> tensor
               "heads"      attention projection outputs (heads * head_dim)    -> tensor
               "conv_in"    conv kernel input channels                         -> fsdp
               "conv_out"   conv kernel output channels                        -> tensor
               "vocab"      embedding table rows                               -> tensor
               "norm"       norm scales and biases                             -> replicated
               "kernel_h", "kernel_w", "kernel_t"  conv window                 -> replicated
  activations: "batch" -> (data, fsdp); "frames" -> sequence; "tokens" -> sequence; "height"/"width"/"channels"
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# (logical name, mesh axis or tuple of mesh axes or None). Order matters only for readability.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("frames", "sequence"),
    ("tokens", "sequence"),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("kernel_t", None),
    ("kernel_h", None),
    ("kernel_w", None),
)


def rules_from_config(overrides: Sequence[Sequence] | None = None):
    """DEFAULT_RULES with some logical names remapped, e.g. ``[("embed", None)]`` to stop fsdp on parameters."""
    table = dict(DEFAULT_RULES)
    for name, target in overrides or ():
        table[name] = tuple(target) if isinstance(target, list) else target
    return tuple(table.items())


def _mesh_axis_size(mesh: Mesh, target) -> int:
    if target is None:
        return 1
    names = (target,) if isinstance(target, str) else tuple(target)
    return int(np.prod([mesh.shape[n] for n in names]))


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names.

    A dimension that the mapped mesh axes do not divide is replicated instead (tiny models and odd channel counts
    such as the 4 latent channels must still run on 8 devices); a mesh axis is used at most once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    parts = []
    for name, size in zip(logical_axes, shape):
        target = table.get(name) if name is not None else None
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1 and n not in used)
        if names and size % _mesh_axis_size(mesh, names) == 0:
            used.update(names)
            parts.append(names[0] if len(names) == 1 else names)
        else:
            parts.append(None)
    return PartitionSpec(*parts)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a (possibly boxed, possibly abstract) Flax parameter tree.

    ``abstract_boxed_params`` is what ``jax.eval_shape(model.init, ...)`` returns: leaves wrapped in
    ``nn.LogicallyPartitioned`` carry their logical names; unboxed leaves are replicated.
    """
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, spec_for(leaf.names, value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_names(abstract_boxed_params):
    """The tree of logical axis-name tuples (None for an unnamed leaf), same structure as the unboxed params."""
    return jax.tree.map(
        lambda leaf: tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else None,
        abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
