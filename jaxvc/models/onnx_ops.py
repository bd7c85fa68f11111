"""ONNX operators in jax.numpy / jax.lax (and numpy), for ``jaxvc.models.onnx_graph``.

Each operator is a function ``op(node, xp, *inputs)``: ``node`` (a ``Node``) carries the attributes and the opset;
``xp`` is numpy when every input is a static numpy constant and jax.numpy otherwise. The numpy path is what keeps
shape arithmetic (``Shape -> Gather -> Concat -> Reshape``, Resize sizes) concrete under ``jax.jit``: it is folded
while tracing. Operators with no numpy meaning here (convolutions, pooling, softmax) always use jax. Layout is ONNX's
(NCHW); semantics and attribute defaults follow the ONNX operator specification for opsets 7..21, onnxruntime being
the reference the tests compare against. Convolutions and matrix products run at ``Precision.HIGHEST``, so that
TPU/GPU don't silently drop float32 to bf16 passes.

The table of supported ops (attributes, static inputs, load-time checks) is ``OPS`` in ``onnx_graph``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST

# TensorProto.DataType codes -> numpy dtypes (the ones Cast and ConstantOfShape may produce here).
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, 16: jnp.bfloat16}


class OnnxError(ValueError):
    """An ONNX model this runner cannot read or cannot execute faithfully; the message names the file and node."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One graph node: attributes already converted to Python / numpy values (strings decoded, tensors as arrays)."""

    name: str
    op_type: str
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]  # "" marks an output nobody asked for
    attrs: dict[str, Any]
    opset: int  # of the default ONNX domain

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


def is_static(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic))


def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


def _channel(vector, ndim: int):
    """A per-channel vector (C,) as (1, C, 1, ...) against an (N, C, spatial...) tensor."""
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


def _jax_dtype(dtype):
    return jax.dtypes.canonicalize_dtype(dtype)


# ---------------------------------------------------------------------------------------------- convolution, pooling
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def _spatial_pads(node: Node, sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """[(begin, end)] per spatial axis, from ``pads`` or ``auto_pad`` (SAME_*: output = ceil(input / stride), the odd
    padding pixel at the end for SAME_UPPER, at the beginning for SAME_LOWER)."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0)] * len(sizes)
    pads = node.attr("pads", [0] * 2 * len(sizes))
    return list(zip(pads[:len(sizes)], pads[len(sizes):]))


def conv(node, xp, x, w, b=None):
    rank = w.ndim - 2
    strides = node.attr("strides", [1] * rank)
    dilations = node.attr("dilations", [1] * rank)
    pads = _spatial_pads(node, x.shape[2:], w.shape[2:], strides, dilations)
    # x (N, C, spatial...), w (O, C / group, kernel...): lax's default dimension order.
    y = lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilations,
                                 feature_group_count=node.attr("group", 1), precision=HIGHEST)
    return y if b is None else y + _channel(b, y.ndim)


def conv_transpose(node, xp, x, w, b=None):
    """The gradient of a convolution: a convolution of the stride-dilated input with the flipped, transposed kernel."""
    rank, group = w.ndim - 2, node.attr("group", 1)
    c_in, c_out_group, kernel = w.shape[0], w.shape[1], w.shape[2:]
    strides = node.attr("strides", [1] * rank)
    dilations = node.attr("dilations", [1] * rank)
    out_pad = node.attr("output_padding", [0] * rank)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [s * (i - 1) + p + e for s, i, p, e in zip(strides, x.shape[2:], out_pad, extent)]  # size without pads
    auto_pad, out_shape = node.attr("auto_pad", "NOTSET"), node.attr("output_shape")
    if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = out_shape[-rank:] if out_shape is not None else [i * s for i, s in zip(x.shape[2:], strides)]
        totals = [max(f - t, 0) for f, t in zip(full, target)]
        # The spec's split of an odd total: the odd pixel at the end for SAME_UPPER, at the start otherwise
        # (onnxruntime 1.30 agrees; the tests cover both).
        pads = [(t // 2, t - t // 2) if auto_pad == "SAME_UPPER" else (t - t // 2, t // 2) for t in totals]
    elif auto_pad == "VALID":
        pads = [(0, 0)] * rank
    else:
        flat = node.attr("pads", [0] * 2 * rank)
        pads = list(zip(flat[:rank], flat[rank:]))
    # w (C_in, C_out / g, k...) -> (g, C_in / g, C_out / g, k...) -> (C_out, C_in / g, k...), spatially flipped.
    w = jnp.reshape(w, (group, c_in // group, c_out_group) + tuple(kernel))
    w = jnp.swapaxes(w, 1, 2).reshape((group * c_out_group, c_in // group) + tuple(kernel))
    w = jnp.flip(w, axis=tuple(range(2, 2 + rank)))
    padding = [(e - 1 - begin, e - 1 - end + p) for e, (begin, end), p in zip(extent, pads, out_pad)]
    y = lax.conv_general_dilated(x, w, (1,) * rank, padding, lhs_dilation=strides, rhs_dilation=dilations,
                                 feature_group_count=group, precision=HIGHEST)
    return y if b is None else y + _channel(b, y.ndim)


def _pool_geometry(node: Node, sizes):
    """Per spatial axis: kernel, stride, dilation, (pad_begin, pad_end) and the output size. With ceil_mode the last
    window may hang over the end (it reads padding), but a window that would start inside the end padding is dropped
    (the ONNX rule, also PyTorch's)."""
    kernel = node.attr("kernel_shape")
    rank = len(kernel)
    strides = node.attr("strides", [1] * rank)
    dilations = node.attr("dilations", [1] * rank)
    pads = _spatial_pads(node, sizes, kernel, strides, dilations)
    ceil = bool(node.attr("ceil_mode", 0)) and node.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    outs = []
    for size, k, s, d, (begin, end) in zip(sizes, kernel, strides, dilations, pads):
        span = size + begin + end - (k - 1) * d - 1
        out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= size + begin:
            out -= 1
        outs.append(out)
    return kernel, strides, dilations, pads, outs


def _reduce_window(x, init, op, kernel, strides, dilations, pads, outs):
    """lax.reduce_window over the spatial axes of (N, C, spatial...), padded with ``init`` so that exactly ``outs``
    windows fit (more end padding for ceil_mode, none cut)."""
    padding = [(0, 0), (0, 0)]
    for size, k, s, d, (begin, end), out in zip(x.shape[2:], kernel, strides, dilations, pads, outs):
        padding.append((begin, max((out - 1) * s + (k - 1) * d + 1 - size - begin, 0)))
    return lax.reduce_window(x, init, op, (1, 1) + tuple(kernel), (1, 1) + tuple(strides), padding,
                             window_dilation=(1, 1) + tuple(dilations))


def max_pool(node, xp, x):
    geometry = _pool_geometry(node, x.shape[2:])
    x = jnp.asarray(x)
    init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    return _reduce_window(x, jnp.array(init, x.dtype), lax.max, *geometry)


def average_pool(node, xp, x):
    kernel, strides, dilations, pads, outs = _pool_geometry(node, x.shape[2:])
    total = _reduce_window(jnp.asarray(x), jnp.array(0, x.dtype), lax.add, kernel, strides, dilations, pads, outs)
    # The divisor per output position, a product over axes of how many taps land on the input (or on the pads too
    # with count_include_pad); never on the extra end a ceil_mode window hangs over.
    include = bool(node.attr("count_include_pad", 0))
    count = np.ones((), np.float32)
    for size, k, s, d, (begin, end), out in zip(x.shape[2:], kernel, strides, dilations, pads, outs):
        taps = np.arange(out)[:, None] * s - begin + np.arange(k)[None, :] * d  # (out, k) input positions
        low, high = (-begin, size + end) if include else (0, size)
        per_axis = ((taps >= low) & (taps < high)).sum(axis=1).astype(np.float32)
        count = np.multiply.outer(count, per_axis)  # (out_0, ..., out_axis)
    return total / count.astype(total.dtype)


def global_pool(reduce):
    def op(node, xp, x):
        return getattr(xp, reduce)(x, axis=tuple(range(2, x.ndim)), keepdims=True)
    return op


# ----------------------------------------------------------------------------------------------------- normalization
def batch_norm(node, xp, x, scale, bias, mean, var, *_):
    inv = scale / xp.sqrt(var + node.attr("epsilon", 1e-5))
    return (x - _channel(mean, x.ndim)) * _channel(inv, x.ndim) + _channel(bias, x.ndim)


def instance_norm(node, xp, x, scale, bias):
    axes = tuple(range(2, x.ndim))
    mean = xp.mean(x, axis=axes, keepdims=True)
    var = xp.mean(xp.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) / xp.sqrt(var + node.attr("epsilon", 1e-5)) * _channel(scale, x.ndim) + _channel(bias, x.ndim)


def softmax(log: bool):
    def op(node, xp, x):
        fn = jax.nn.log_softmax if log else jax.nn.softmax
        if node.opset < 13:  # the input coerced to 2-D at ``axis``, normalized over the second dimension
            axis = node.attr("axis", 1) % max(x.ndim, 1)
            flat = jnp.reshape(x, (int(np.prod(x.shape[:axis])), -1))
            return fn(flat, axis=-1).reshape(x.shape)
        return fn(x, axis=node.attr("axis", -1))
    return op


# ---------------------------------------------------------------------------------------------------- elementwise
def unary(fn_name: str):
    def op(node, xp, x):
        return getattr(xp, fn_name)(x)
    return op


def jax_unary(fn: Callable):
    def op(node, xp, x):
        return fn(jnp.asarray(x))
    return op


def variadic(fn_name: str):
    def op(node, xp, *xs):
        return functools.reduce(getattr(xp, fn_name), xs)
    return op


def divide(node, xp, a, b):
    if np.issubdtype(np.result_type(a.dtype, b.dtype), np.integer):  # integer division truncates toward zero
        return (xp.abs(a) // xp.abs(b)) * xp.sign(a) * xp.sign(b)
    return a / b


def power(node, xp, a, b):
    return xp.power(a, b).astype(a.dtype)  # the base's type, whatever the exponent's


def mean(node, xp, *xs):
    return functools.reduce(xp.add, xs) / len(xs)


def relu(node, xp, x):
    return xp.maximum(x, xp.zeros((), x.dtype))


def leaky_relu(node, xp, x):
    return xp.where(x < 0, x * node.attr("alpha", 0.01), x)


def prelu(node, xp, x, slope):
    # slope broadcasts unidirectionally to x: the exporter's (C, 1, 1) slope meets (N, C, H, W)
    return xp.where(x < 0, x * slope, x)


def hard_sigmoid(node, xp, x):
    return xp.clip(x * node.attr("alpha", 0.2) + node.attr("beta", 0.5), 0, 1)


def clip(node, xp, x, low=None, high=None):
    if node.opset < 11:
        low, high = node.attr("min"), node.attr("max")
    if low is not None:
        x = xp.maximum(x, xp.asarray(low, x.dtype))
    if high is not None:
        x = xp.minimum(x, xp.asarray(high, x.dtype))
    return x


# ---------------------------------------------------------------------------------------------------- linear algebra
def _matmul(xp, a, b):
    return np.matmul(a, b) if xp is np else jnp.matmul(a, b, precision=HIGHEST)


def matmul(node, xp, a, b):
    return _matmul(xp, a, b)


def gemm(node, xp, a, b, c=None):
    a = a.T if node.attr("transA", 0) else a  # (M, K)
    b = b.T if node.attr("transB", 0) else b  # (K, N)
    y = _matmul(xp, a, b)
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    y = y if alpha == 1.0 else y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


# -------------------------------------------------------------------------------------------------- shape, indexing
def shape(node, xp, x):
    return np.array(x.shape, np.int64)[node.attr("start", 0):node.attr("end")]  # static even for traced x


def size(node, xp, x):
    return np.array(int(np.prod(x.shape)), np.int64)


def reshape(node, xp, x, target):
    target = _ints(target)
    if not node.attr("allowzero", 0):  # 0 copies the input's dimension; -1 is inferred by reshape itself
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    return xp.reshape(x, target)


def flatten(node, xp, x):
    axis = node.attr("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return xp.reshape(x, (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))))


def transpose(node, xp, x):
    return xp.transpose(x, node.attr("perm", list(range(x.ndim))[::-1]))


def concat(node, xp, *xs):
    return xp.concatenate(xs, axis=node.attr("axis"))


def split(node, xp, x, sizes=None):
    axis = node.attr("axis", 0) % x.ndim
    dim, count = x.shape[axis], len(node.outputs)
    sizes = node.attr("split") if sizes is None or np.size(sizes) == 0 else _ints(sizes)
    if not sizes and node.attr("num_outputs") is not None:  # opset 18: equal chunks, the last one smaller
        chunk = -(-dim // node.attr("num_outputs"))
        sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
    elif not sizes:
        if dim % count:
            raise OnnxError(f"cannot split a dimension of {dim} into {count} equal parts")
        sizes = [dim // count] * count
    bounds = np.cumsum([0] + list(sizes))
    return tuple(x[(slice(None),) * axis + (slice(int(b), int(e)),)] for b, e in zip(bounds[:-1], bounds[1:]))


def slice_(node, xp, x, starts=None, ends=None, axes=None, steps=None):
    if node.opset < 10:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:  # clamped to [0, dim - 1] and [-1, dim - 1]; an end of -1 means "through index 0"
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index[axis % x.ndim] = slice(start, None if end < 0 else end, step)
    return x[tuple(index)]


def squeeze(node, xp, x, axes=None):
    axes = node.attr("axes") if axes is None else _ints(axes)
    if not axes:
        return xp.reshape(x, [d for d in x.shape if d != 1])
    return xp.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def unsqueeze(node, xp, x, axes=None):
    axes = node.attr("axes") if axes is None else _ints(axes)
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = xp.expand_dims(x, axis)
    return x


def gather(node, xp, x, indices):
    axis = node.attr("axis", 0) % x.ndim
    indices = xp.where(indices < 0, indices + x.shape[axis], indices)  # negative indices count from the end
    return xp.take(x, indices, axis=axis)


def constant(node, xp):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            return np.asarray(value, np.float32 if "float" in key else np.int64 if "int" in key else None)
    raise OnnxError("a Constant without a value")


def constant_of_shape(node, xp, target):
    value = node.attr("value", np.zeros(1, np.float32))
    return np.full(_ints(target), value.reshape(()), value.dtype)


def identity(node, xp, x):
    return x


def dropout(node, xp, x, ratio=None, training_mode=None):
    if training_mode is not None and bool(training_mode):
        raise OnnxError("Dropout with training_mode=True is not supported (inference only)")
    if len(node.outputs) > 1 and node.outputs[1]:
        return x, xp.ones(x.shape, bool)  # inference: nothing dropped
    return x


def cast(node, xp, x):
    dtype = ONNX_DTYPES[node.attr("to")]
    return x.astype(dtype) if xp is np else x.astype(_jax_dtype(dtype))


def expand(node, xp, x, target):
    return xp.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(target))))


def tile(node, xp, x, repeats):
    return xp.tile(x, _ints(repeats))


def where(node, xp, condition, a, b):
    return xp.where(condition, a, b)


def range_(node, xp, start, limit, delta):
    return np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype)


def pad(node, xp, x, pads=None, value=None, axes=None):
    if node.opset < 11:
        pads, value = node.attr("pads"), node.attr("value", 0.0)
    pads, rank = _ints(pads), x.ndim
    axes = list(range(rank)) if axes is None else [a % rank for a in _ints(axes)]
    widths = [(0, 0)] * rank
    for j, axis in enumerate(axes):
        widths[axis] = (pads[j], pads[j + len(axes)])
    grow = [(max(b, 0), max(e, 0)) for b, e in widths]
    mode = node.attr("mode", "constant")
    if mode == "constant":
        fill = 0 if value is None else xp.reshape(xp.asarray(value), ()).astype(x.dtype)
        x = xp.pad(x, grow, mode="constant", constant_values=fill)
    else:  # numpy's "edge" / "reflect" (no repeated border) are ONNX's
        x = xp.pad(x, grow, mode=mode)
    # negative pads crop
    return x[tuple(slice(-min(b, 0), x.shape[i] + min(e, 0)) for i, (b, e) in enumerate(widths))]


def reduce(fn_name: str):
    def op(node, xp, x, axes=None):
        axes = node.attr("axes") if axes is None else _ints(axes)
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = range(x.ndim)
        return getattr(xp, fn_name)(x, axis=tuple(a % x.ndim for a in axes), keepdims=bool(node.attr("keepdims", 1)))
    return op


def arg_reduce(fn_name: str):
    def op(node, xp, x):
        axis = node.attr("axis", 0) % x.ndim
        if node.attr("select_last_index", 0):
            index = x.shape[axis] - 1 - getattr(xp, fn_name)(xp.flip(x, axis), axis=axis)
        else:
            index = getattr(xp, fn_name)(x, axis=axis)
        if node.attr("keepdims", 1):
            index = xp.expand_dims(index, axis)
        return index.astype(np.int64) if xp is np else index
    return op


def top_k(node, xp, x, k):
    k, axis = _ints(k)[0], node.attr("axis", -1) % x.ndim
    moved = jnp.moveaxis(jnp.asarray(x), axis, -1)
    if node.attr("largest", 1):
        values, indices = lax.top_k(moved, k)
    else:
        values, indices = lax.top_k(-moved, k)
        values = -values
    return jnp.moveaxis(values, -1, axis), jnp.moveaxis(indices, -1, axis)


# --------------------------------------------------------------------------------------------------------- resizing
COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn",
                     "half_pixel_symmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _source_coordinates(mode: str, out: int, size: int, scale: np.float32) -> np.ndarray:
    """Where each output position samples the input, along one axis, in float32 as onnxruntime computes it."""
    x, half = np.arange(out, dtype=np.float32), np.float32(0.5)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out > 1 else np.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if mode == "align_corners":
        return np.zeros_like(x) if out == 1 else x * np.float32(size - 1) / np.float32(out - 1)
    adjustment = np.float32(out) / (scale * np.float32(size))  # half_pixel_symmetric
    return np.float32(size) / 2 * (1 - adjustment) + (x + half) / scale - half


def _nearest_index(coords: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    floor = np.floor(coords)
    frac = coords - floor  # exact in float32
    if mode == "simple":  # Upsample and Resize-10: truncate, or ceil when downsampling (onnxruntime)
        mode = "ceil" if downsampling else "floor"
    index = {"floor": floor, "ceil": np.ceil(coords), "round_prefer_floor": floor + (frac > 0.5),
             "round_prefer_ceil": floor + (frac >= 0.5)}[mode]
    return index.astype(np.int64)


def _resize(xp, x, scales, sizes, mode: str, coordinate_mode: str, nearest_mode: str):
    """Separable resize, one axis at a time, with static (numpy) gather indices and weights."""
    for axis in range(x.ndim):
        size = x.shape[axis]
        if sizes is not None:
            out = int(sizes[axis])
            scale = np.float32(out) / np.float32(size)
        else:
            scale = np.float32(scales[axis])
            out = int(np.floor(np.float32(size) * scale))
        if out == size and scale == 1:
            continue
        coords = _source_coordinates(coordinate_mode, out, size, scale)  # (out,)
        if mode == "nearest":
            index = np.clip(_nearest_index(coords, nearest_mode, scale < 1), 0, size - 1)
            x = xp.take(x, index, axis=axis)
            continue
        coords = np.clip(coords, 0, size - 1)  # linear: sample positions clamped to the input (edge values)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        weight = (coords - low).astype(np.float32).reshape((1,) * axis + (out,) + (1,) * (x.ndim - axis - 1))
        x = (xp.take(x, low, axis=axis) * (1 - weight) + xp.take(x, high, axis=axis) * weight).astype(x.dtype)
    return x


def resize(node, xp, x, roi=None, scales=None, sizes=None):
    if node.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        return _resize(xp, x, roi, None, node.attr("mode", "nearest"), "asymmetric", "simple")
    axes = node.attr("axes")
    axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in axes]
    if sizes is not None and np.size(sizes):
        full = list(x.shape)
        for axis, s in zip(axes, _ints(sizes)):
            full[axis] = s
        scales, sizes = None, full
    elif scales is not None and np.size(scales):
        full = np.ones(x.ndim, np.float32)
        full[axes] = np.asarray(scales, np.float32).reshape(-1)
        scales = full
    else:
        raise OnnxError("Resize needs non-empty scales or sizes")
    return _resize(xp, x, scales, sizes, node.attr("mode", "nearest"),
                   node.attr("coordinate_transformation_mode", "half_pixel"),
                   node.attr("nearest_mode", "round_prefer_floor"))


def upsample(node, xp, x, scales=None):
    scales = node.attr("scales") if scales is None else scales
    mode = "linear" if node.attr("mode", "nearest") == "bilinear" else node.attr("mode", "nearest")
    return _resize(xp, x, np.asarray(scales, np.float32).reshape(-1), None, mode, "asymmetric", "simple")
