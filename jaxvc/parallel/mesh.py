"""Device meshes from config: axes ``data``, ``fsdp``, ``tensor``, ``sequence``; a size of -1 fills the rest."""
from __future__ import annotations

import contextlib
from typing import Mapping

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh

from jaxvc.parallel.rules import DEFAULT_RULES, MESH_AXES


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one axis given as -1 so that the product equals ``num_devices``; check the product otherwise."""
    unknown = [a for a in MESH_AXES if a not in sizes]
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    del unknown
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {fill} in {sizes}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {sizes}")
        sizes[fill[0]] = num_devices // known
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(f"mesh: axis sizes {sizes} multiply to {int(np.prod(list(sizes.values())))}, "
                         f"but there are {num_devices} devices")
    return sizes


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with all four named axes (size-1 axes included so the rule table always resolves).

    Axes are ``AxisType.Auto``: ``jax.make_mesh`` would default to explicit axes, under which Flax's logical
    constraints behave differently from the GSPMD propagation the models are written for.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(sizes or {"data": -1}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """Make ``mesh`` and ``rules`` current so ``nn.with_logical_constraint`` inside models takes effect.

    A plain ``with mesh:`` is not enough for Flax's constraints in current JAX; ``jax.set_mesh`` is.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh
