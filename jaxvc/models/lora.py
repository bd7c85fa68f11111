"""Low-rank adapters on any jaxvc model without touching the model: LoRA on linear/conv layers, and output adapters.

Two placements, one mechanism. An adapter is a set of *sites* (module paths, e.g.
``("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q")``) and, at each site, a pair
``down`` / ``up`` of low-rank factors:

* ``placement="input"`` is LoRA (Hu et al.; peft's ``LoraLayer``) on a ``Dense`` or ``Conv`` layer ``W``:
  ``y = W x + s * up(down(x))``, with ``down`` (in, r) for a linear layer, (*window, in, r) for a convolution (same
  strides and padding as ``W``), and ``up`` (r, out). CustomCrafter's SSLM, Still-Moving's motion adapter and the
  disentangled S2V method's adapters are of this kind, and so are the DreamBooth/LoRA files users bring.
* ``placement="output"`` adapts what any module returns: ``y = f(x) + s * up(down(f(x)))`` on the channels of
  ``f``'s output, ``down`` (C, r), ``up`` (r, C): Still-Moving's Spatial Adapters, "linear projections of the features
  the injected T2I layers produce", placed after whole ResNet / transformer blocks.

``s = scale * alpha / rank`` (peft's scaling; ``alpha=None`` means alpha = rank). ``up`` starts at zero, so a fresh
adapter is the identity. ``scale`` may be a traced scalar: CustomCrafter changes it during sampling, and scale 0
removes an adapter (Still-Moving drops its motion adapter at inference).

The adapter tree mirrors the module tree, ``{"down_blocks_0": {...: {"to_q": {"down": ..., "up": ...}}}}``, so it
lives beside the model's parameters in a method's parameter tree (``params["adapters"][name]``), trains, shards and
checkpoints like any parameter. It is applied by intercepting module calls (``flax.linen.intercept_methods``) while
the model runs: the unadapted model is unchanged, works inside ``nn.remat``/``jit``/``grad``, and the adapter's
backward pass costs only the low-rank products (merging ``W + s * down @ up`` would make the frozen ``W`` need a
full weight gradient). ``merge`` folds input adapters into the weights for export or for a fixed customization.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxvc.models.layers import Conv, Dense, conv_nd

Path = tuple[str, ...]
PLACEMENTS = ("input", "output")
DOWN_INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Where an adapter goes and its shape. ``include`` / ``exclude`` are regexes over the ``/``-joined module path:
    a module is a site when an include pattern matches the *whole* path and no exclude pattern matches anywhere in
    it (e.g. ``r".*/attn[12]/to_[qkv]"``, exclude ``r"motion_modules_"``)."""
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    rank: int = 4
    alpha: float | None = None
    placement: str = "input"
    down_init: str = "kaiming"  # peft's default (kaiming-uniform, a = sqrt 5); "gaussian": std 1/rank (CustomCrafter)
    # peft's lora_dropout: the adapter's input (not the layer's) dropped at this rate in training, i.e. when the
    # AppliedAdapter carries a dropout_rng; none at inference
    dropout: float = 0.0

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"adapter placement {self.placement!r}: expected one of {PLACEMENTS}")
        if self.down_init not in DOWN_INITS:
            raise ValueError(f"adapter down_init {self.down_init!r}: expected one of {DOWN_INITS}")
        if int(self.rank) < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0 or (self.dropout and self.placement != "input"):
            raise ValueError(f"adapter dropout {self.dropout}: expected a rate in [0, 1), on an input (LoRA) adapter")
        if not self.include:
            raise ValueError("adapter include patterns are empty: the adapter would have no sites")
        for pattern in (*self.include, *self.exclude):
            re.compile(pattern)

    @property
    def scaling(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / float(self.rank)

    def matches(self, path: Path) -> bool:
        joined = "/".join(path)
        return (any(re.fullmatch(p, joined) for p in self.include)
                and not any(re.search(p, joined) for p in self.exclude))


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted module: its path, the features in and out, the conv window (``()`` for linear / output sites) and
    the logical axis names of the in / out features (for sharding the factors like the weight they adapt)."""
    path: Path
    in_features: int
    out_features: int
    window: tuple[int, ...] = ()
    axes: tuple[str | None, str | None] = (None, None)


def find_sites(run_model: Callable[[], Any], spec: AdapterSpec) -> dict[Path, Site]:
    """The sites of ``spec`` in a model: ``run_model()`` runs the model once (it is only traced, with
    ``jax.eval_shape``) and every module call whose path the spec matches is recorded. Raises if there is none."""
    found: dict[Path, Site] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not spec.matches(module.path):
            return out
        if spec.placement == "input":
            if isinstance(module, Dense):
                found[module.path] = Site(module.path, args[0].shape[-1], module.features, (), tuple(module.axes))
            elif isinstance(module, Conv):
                found[module.path] = Site(module.path, args[0].shape[-1], module.features, tuple(module.kernel_size),
                                          ("conv_in", "conv_out"))
        elif hasattr(out, "shape"):
            found[module.path] = Site(module.path, out.shape[-1], out.shape[-1])
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: run_model())  # a new function each time: a cached trace would record nothing
    if not found:
        kind = "Dense/Conv layers" if spec.placement == "input" else "modules"
        raise ValueError(f"adapter matches no {kind} of the model (include {spec.include}, exclude {spec.exclude})")
    return found


def _factor_shapes(site: Site, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (*site.window, site.in_features, rank), (rank, site.out_features)


def init_adapter(rng: jax.Array, sites: Mapping[Path, Site], spec: AdapterSpec, dtype=jnp.float32,
                 boxed: bool = False) -> dict:
    """A fresh adapter tree (``up`` = 0: the identity). ``boxed``: leaves carry logical axis names (``down`` shares
    the adapted weight's input axis, ``up`` its output axis; the rank axis is never sharded)."""
    flat = {}
    for index, (path, site) in enumerate(sorted(sites.items())):
        down_shape, up_shape = _factor_shapes(site, spec.rank)
        fan_in = int(np.prod(down_shape[:-1]))
        key = jax.random.fold_in(rng, index)
        if spec.down_init == "gaussian":
            down = jax.random.normal(key, down_shape, dtype) / spec.rank
        else:  # kaiming_uniform(a=sqrt 5) on torch's (r, in, *window) weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            down = jax.random.uniform(key, down_shape, dtype, -bound, bound)
        up = jnp.zeros(up_shape, dtype)
        if boxed:
            in_axis, out_axis = site.axes
            down = nn.LogicallyPartitioned(down, (None,) * len(site.window) + (in_axis, None))
            up = nn.LogicallyPartitioned(up, (None, out_axis))
        flat[path + ("down",)] = down
        flat[path + ("up",)] = up
    return traverse_util.unflatten_dict(flat)


def adapter_sites(tree: Mapping) -> dict[Path, dict]:
    """``{site path: {"down": array, "up": array}}`` of an adapter tree."""
    flat = traverse_util.flatten_dict(nn.unbox(dict(tree)))
    sites: dict[Path, dict] = {}
    for path, value in flat.items():
        if path[-1] not in ("down", "up"):
            raise ValueError(f"adapter tree leaf {'/'.join(path)}: expected .../down or .../up")
        sites.setdefault(tuple(path[:-1]), {})[path[-1]] = value
    for path, pair in sites.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"adapter site {'/'.join(path)} has {sorted(pair)}; expected both down and up")
    return sites


@dataclasses.dataclass(frozen=True)
class AppliedAdapter:
    """An adapter to apply while the model runs: its spec, its tree, and a scale (a float or a traced scalar);
    ``dropout_rng`` (a PRNG key, training only) turns on the spec's dropout."""
    spec: AdapterSpec
    tree: Mapping
    scale: Any = 1.0
    dropout_rng: Any = None


def dropout_keep(rng, path: Path, shape, rate: float):
    """The keep mask (bool, ``shape``) of a site's adapter input: its own key, ``rng`` folded with a hash of the
    site's path, so every site drops independently and the same way on every host."""
    site = zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF
    return jax.random.bernoulli(jax.random.fold_in(rng, site), 1.0 - rate, shape)


def _input_branch(module, x, pair, dtype):
    down, up = pair["down"].astype(dtype), pair["up"].astype(dtype)
    x = x.astype(dtype)
    if isinstance(module, Conv):
        if down.ndim != len(module.kernel_size) + 2:
            raise ValueError(f"adapter at {'/'.join(module.path)}: down {down.shape} does not fit the conv window "
                             f"{tuple(module.kernel_size)}")
        hidden = conv_nd(x, down, module.strides, module.padding)
    elif isinstance(module, Dense):
        hidden = jnp.dot(x, down)
    else:
        raise ValueError(f"input adapter at {'/'.join(module.path)}: {type(module).__name__} is not a Dense or Conv "
                         "layer")
    return jnp.dot(hidden, up)


@contextlib.contextmanager
def applied(adapters: Iterable[AppliedAdapter]):
    """Run a model with adapters: ``with applied([...]): model.apply(...)``. Every site must be reached by the
    model run inside the block, else ``ValueError`` (an adapter that silently does nothing is a wrong result)."""
    table: dict[Path, list[tuple[AppliedAdapter, dict]]] = {}
    for adapter in adapters:
        for path, pair in adapter_sites(adapter.tree).items():
            table.setdefault(path, []).append((adapter, pair))
    reached: set[Path] = set()

    def intercept(next_fun, args, kwargs, context):
        entries = table.get(context.module.path) if context.method_name == "__call__" else None
        out = next_fun(*args, **kwargs)
        if not entries:
            return out
        reached.add(context.module.path)
        dtype = getattr(context.module, "dtype", out.dtype)
        base = out
        for adapter, pair in entries:
            scale = adapter.scale * adapter.spec.scaling
            if adapter.spec.placement == "input":
                x = args[0]
                if adapter.spec.dropout and adapter.dropout_rng is not None:  # inverted dropout, as torch's
                    rate = adapter.spec.dropout
                    keep = dropout_keep(adapter.dropout_rng, context.module.path, x.shape, rate)
                    x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
                delta = _input_branch(context.module, x, pair, dtype)
            else:
                delta = jnp.dot(jnp.dot(base.astype(dtype), pair["down"].astype(dtype)), pair["up"].astype(dtype))
            out = out + (jnp.asarray(scale, dtype) * delta).astype(out.dtype)
        return out

    if not table:
        yield
        return
    with nn.intercept_methods(intercept):
        yield
    missing = sorted("/".join(p) for p in set(table) - reached)
    if missing:
        raise ValueError(f"{len(missing)} adapter site(s) were not reached by the model run (wrong model, or a tree "
                         f"for another architecture): {missing[:5]}")


def merge(params: Mapping, adapter: AppliedAdapter) -> dict:
    """``params`` (a model's parameter tree, sites relative to it) with an input adapter folded into the weights:
    ``kernel + s * down @ up`` (conv: contracted over the rank), in float32, back in the kernel's dtype. A fixed
    customization (a user's DreamBooth LoRA) then costs nothing at run time. Host (numpy) kernels, as loaded from
    files, are merged on the host: a model's kernels never sit on the device in float32 on the way."""
    if adapter.spec.placement != "input":
        raise ValueError("only input (LoRA) adapters can be merged into weights; output adapters follow non-linear "
                         "blocks")
    flat = dict(traverse_util.flatten_dict(nn.unbox(dict(params))))
    scale = float(adapter.scale) * adapter.spec.scaling
    for path, pair in adapter_sites(adapter.tree).items():
        key = path + ("kernel",)
        if key not in flat:
            raise ValueError(f"adapter site {'/'.join(path)}: the model has no kernel there")
        kernel = flat[key]
        xp = np if isinstance(kernel, np.ndarray) else jnp
        delta = xp.tensordot(np.asarray(pair["down"], np.float32), np.asarray(pair["up"], np.float32), 1)
        if delta.shape != kernel.shape:
            raise ValueError(f"adapter site {'/'.join(path)}: down @ up is {delta.shape}, the kernel {kernel.shape}")
        flat[key] = (kernel.astype(np.float32) + np.float32(scale) * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def count(tree: Mapping) -> int:
    """Number of adapter parameters."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(dict(tree)))))


def sites_summary(sites: Sequence[Path] | Mapping[Path, Any], depth: int = 2) -> str:
    """``"down_blocks_0 (4), up_blocks_1 (6)"``: where an adapter sits, grouped by the first ``depth`` names."""
    groups: dict[str, int] = {}
    for path in sites:
        groups["/".join(path[:depth])] = groups.get("/".join(path[:depth]), 0) + 1
    return ", ".join(f"{name} ({n})" for name, n in sorted(groups.items()))
