"""Device meshes from config: axes ``data``, ``fsdp``, ``tensor``, ``sequence``; a size of -1 fills the rest."""
from __future__ import annotations

import contextlib
from typing import Mapping

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh

from jaxvc.parallel.rules import DEFAULT_RULES, MESH_AXES


def parse_axis_sizes(text: str) -> dict[str, int]:
    """``"data=2,fsdp=32"`` -> ``{"data": 2, "fsdp": 32}``: the axes given (data, fsdp, tensor, sequence), each a
    size >= 1 or -1 (fill the rest; at most one). Raises ValueError naming the bad part."""
    sizes: dict[str, int] = {}
    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not parts:
        raise ValueError(f"mesh '{text}': no axes given (e.g. data=4 or data=1,fsdp=64)")
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"mesh '{text}': '{part}' is not AXIS=SIZE with the axis one of "
                             f"{', '.join(MESH_AXES)}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh '{text}': size '{value}' of axis {name} is not an integer") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh '{text}': axis {name} has size {size}; sizes are >= 1 (or -1 to fill)")
        if name in sizes:
            raise ValueError(f"mesh '{text}': axis {name} given twice")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh '{text}': at most one axis may be -1")
    return sizes


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one axis given as -1 so that the product equals ``num_devices``; check the product otherwise."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
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
