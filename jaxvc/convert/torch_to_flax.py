"""Fill a Flax parameter tree from a PyTorch state dict, checking every key and shape.

jaxvc's modules are named so that a torch key maps mechanically onto a Flax path: numeric segments join the
segment before them (``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/<leaf>``), and the
leaf name ``weight`` becomes whichever of ``kernel``/``scale``/``embedding`` the Flax module has. The *target* tree
(from ``jax.eval_shape(model.init, ...)``) decides the layout change: Linear weights (out, in) are transposed to
(in, out), Conv weights (O, I, *window) become (*window, I, O), norms and embeddings stay as they are.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import numpy as np
from flax import linen as nn
from flax import traverse_util

_NUMERIC = re.compile(r"^\d+$")


class CheckpointMismatchError(ValueError):
    """Keys missing from or unexpected in a checkpoint, or shapes that do not match the model."""


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
    """``'a.b.0.c.weight'`` -> ``(('a', 'b_0', 'c'), 'weight')``."""
    parts = key.split(".")
    merged: list[str] = []
    for part in parts[:-1]:
        if _NUMERIC.match(part) and merged:
            merged[-1] = f"{merged[-1]}_{part}"
        else:
            merged.append(part)
    return tuple(merged), parts[-1]


def _to_flax_layout(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if name == "kernel":
        if value.ndim == 2 and len(target_shape) == 2:
            return value.T
        if value.ndim >= 3 and len(target_shape) == value.ndim:
            return np.transpose(value, (*range(2, value.ndim), 1, 0))
        if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
            return value[:, :, 0, 0].T  # a 1x1 conv weight used by a linear layer
        if value.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
            return value.T[None, None]  # a linear weight used by a 1x1 conv
    return value


def fill_params(target, state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                ignore: Iterable[str] = (), dtype=np.float32, partial: bool = False) -> dict:
    """Build the params tree of ``target`` (abstract, possibly boxed) from ``state_dict``.

    ``ignore``: regexes of checkpoint keys that are known and deliberately not loaded (buffers such as
    positional tables). Raises ``CheckpointMismatchError`` listing every missing key, unexpected key and shape
    mismatch, with the model path and the checkpoint key side by side. ``partial``: a state dict of some of the
    parameters (torch's ``load_state_dict(strict=False)`` minus its silence): missing keys are allowed and the tree
    holds the given ones only; unexpected keys and shapes are still errors.
    """
    flat_target = traverse_util.flatten_dict(nn.unbox(target))
    ignore_patterns = [re.compile(p) for p in ignore]
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, shape_errors = [], []
    for key, value in state_dict.items():
        if any(p.search(key) for p in ignore_patterns):
            continue
        module_path, leaf = torch_key_to_module_path(key)
        if leaf == "weight":
            candidates = [module_path + (name,) for name in ("kernel", "scale", "embedding")]
        else:
            candidates = [module_path + (leaf,)]
        path = next((c for c in candidates if c in flat_target), None)
        if path is None:
            unexpected.append(key)
            continue
        want = tuple(flat_target[path].shape)
        array = _to_flax_layout(path[-1], np.asarray(value), want)
        if tuple(array.shape) != want:
            shape_errors.append(f"{key} {tuple(np.shape(value))} -> {'/'.join(path)} expects {want} "
                                f"(torch layout {_torch_layout_hint(path[-1], want)})")
            continue
        filled[path] = array.astype(dtype) if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V" \
            else array
    missing = [] if partial else sorted("/".join(p) + f" {tuple(flat_target[p].shape)}" for p in flat_target
                                        if p not in filled)
    if missing or unexpected or shape_errors:
        raise CheckpointMismatchError(_mismatch_message(source, missing, sorted(unexpected), shape_errors,
                                                        len(flat_target)))
    return traverse_util.unflatten_dict(filled)


def _torch_layout_hint(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 2:
        return flax_shape[::-1]
    if leaf == "kernel" and len(flax_shape) > 2:
        return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])
    return flax_shape


def _mismatch_message(source, missing, unexpected, shape_errors, total, limit=25) -> str:
    lines = [f"{source}: checkpoint does not match the model ({total} parameters expected)"]
    for title, items in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("shape mismatches", shape_errors)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


def rename_keys(state_dict: Mapping[str, np.ndarray], rules: Iterable[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Apply regex substitutions ``(pattern, replacement)`` in order to every key."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out

