"""The sweep grid: ``--grid key=v1,v2,...`` arguments -> the list of points to run (their Cartesian product).

Keys:
  ``model``       a row of the size table (``jaxvc/sweep/sizes.py``), e.g. ``model=xs,s,m``
  ``mesh``        mesh layouts separated by ``|`` (a layout has commas): ``mesh=data=1|data=2|data=2,fsdp=2``;
                  axes left out are 1, one axis may be -1 (all remaining devices)
  anything else   a config field, set like ``--config.<key>=<value>`` (``batch_size=4,8``, ``optim.lr=1e-4,3e-4``)
Values are split on ``|`` when the list has one, else on ``,``. The first ``--grid`` is the outermost loop.
Every point has a stable id built from its values (the name of its folder, what ``--resume`` matches on).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re

from jaxvc.parallel.mesh import MESH_AXES, parse_axis_sizes

MODEL_KEY = "model"
MESH_KEY = "mesh"
# Short names in point ids for the common keys (ids stay readable: model-s_bs-4_lr-0.0003_mesh-data2).
ID_NAMES = {"batch_size": "bs", "optim.lr": "lr"}


class GridError(ValueError):
    """A ``--grid`` argument that cannot be used."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 1, "sequence": 1}`` (axes left out are 1)."""
    try:
        return {**{axis: 1 for axis in MESH_AXES}, **parse_axis_sizes(text)}
    except ValueError as err:
        raise GridError(str(err)) from None


def mesh_chips(sizes: dict[str, int], num_devices: int | None = None) -> int | None:
    """Devices a layout uses (a -1 axis takes all of ``num_devices``; None when that is unknown)."""
    if -1 in sizes.values():
        return num_devices
    return math.prod(sizes.values())


def format_mesh(sizes: dict[str, int]) -> str:
    """The short form of a layout: the axes that are not 1 (``data=1`` when all are)."""
    parts = [f"{axis}={size}" for axis, size in sizes.items() if size != 1]
    return ",".join(parts) or "data=1"


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
    """``"optim.lr=1e-4,3e-4"`` -> ``("optim.lr", ["1e-4", "3e-4"])``."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    if not sep or not key or not values.strip():
        raise GridError(f"--grid '{text}': expected KEY=V1,V2,... (mesh layouts: mesh=data=1|data=2,fsdp=2)")
    separator = "|" if "|" in values else ","
    if key == MESH_KEY and separator == "," and values.count("=") > 1:
        # "mesh=data=2,fsdp=2" is one layout with two axes, not two layouts
        separator = "|"
    items = [v.strip() for v in values.split(separator)]
    if any(not v for v in items):
        raise GridError(f"--grid '{text}': an empty value between separators")
    if len(set(items)) != len(items):
        raise GridError(f"--grid '{text}': repeated values {sorted(v for v in set(items) if items.count(v) > 1)}")
    if key == MESH_KEY:
        for item in items:
            parse_mesh(item)
    return key, items


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text.replace("=", "").replace(",", "-"))


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: the grid values it takes, in grid order (strings, as given)."""
    values: tuple[tuple[str, str], ...]

    @property
    def as_dict(self) -> dict[str, str]:
        return dict(self.values)

    @property
    def id(self) -> str:
        # a -1 mesh axis (all remaining devices) reads "all": "fsdp-1" would look like fsdp=1
        parts = [f"{ID_NAMES.get(key, key)}-{_slug(value.replace('=-1', '=all') if key == MESH_KEY else value)}"
                 for key, value in self.values]
        return "_".join(parts) or "base"

    @property
    def model(self) -> str | None:
        return self.as_dict.get(MODEL_KEY)

    @property
    def mesh(self) -> dict[str, int] | None:
        text = self.as_dict.get(MESH_KEY)
        return None if text is None else parse_mesh(text)

    @property
    def overrides(self) -> list[tuple[str, str]]:
        """The config overrides of this point (every key but ``model`` and ``mesh``)."""
        return [(k, v) for k, v in self.values if k not in (MODEL_KEY, MESH_KEY)]


def expand(axes: list[tuple[str, list[str]]]) -> list[Point]:
    """All combinations of the axes' values (the first axis varies slowest); no axes -> one base point."""
    keys = [key for key, _ in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise GridError(f"--grid given twice for {', '.join(repeated)}; put all values in one --grid")
    points = [Point(tuple(zip(keys, combo))) for combo in itertools.product(*[values for _, values in axes])]
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise GridError(f"two grid points map to the same id ({sorted(i for i in set(ids) if ids.count(i) > 1)}); "
                        f"make the values differ in letters or digits")
    return points


def parse_grid(args: list[str]) -> list[Point]:
    """``--grid`` arguments -> points."""
    return expand([parse_grid_arg(text) for text in args])
