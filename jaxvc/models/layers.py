"""Basic layers with logical axis names on every parameter and torch-matching numerics.

Flax defaults differ from PyTorch in ways that break parity (see shared/specs/PARITY.md): LayerNorm eps (1e-6 vs
1e-5), GroupNorm's fast variance, and the tanh GELU. The wrappers here make each choice explicit.
Parameters are created in ``param_dtype`` (float32 by default) and cast to ``dtype`` (the compute dtype);
normalization statistics are always float32.

Parameter names follow the torch checkpoints (``kernel`` = transposed ``weight``, ``scale`` = norm ``weight``,
``bias``, ``embedding``) so that a converter maps keys mechanically (see ``jaxvc/convert/torch_to_flax.py``).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


# Logical names of a channels-last video activation (B, T, H, W, C); the rule table (jaxvc/parallel/rules.py) puts
# batch on (data, fsdp) and frames on sequence. The UNet's input/output and the Wan VAE's blocks are constrained by it.
VIDEO_AXES = ("batch", "frames", "height", "width", "channels")


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


def gelu_exact(x):
    """torch's default ``nn.GELU()``: x/2 (1 + erf(x / sqrt 2)), torch's own formula. ``jax.nn.gelu`` defaults to the
    tanh approximation, and its exact form goes through erfc, which XLA:CPU evaluates about 3x slower than erf (in a
    profile of the demo's train step the feed-forwards held 45 of 246 ms of op time); the two differ by under 1e-6."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class Dense(nn.Module):
    """Linear layer ``y = x @ kernel + bias``; ``kernel`` (in, out) is torch's ``weight.T``."""
    features: int
    use_bias: bool = True
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def conv_nd(x, kernel, strides: Sequence[int] | int = 1, padding: Any = 1):
    """Channels-last N-d convolution: x (N, *spatial, I), kernel (*window, I, O) -> (N, *spatial', O).

    ``padding`` is an int (symmetric, as torch's ``padding=``) or an explicit per-dimension list of (lo, hi)."""
    nd = kernel.ndim - 2
    if isinstance(padding, int):
        padding = [(padding, padding)] * nd
    strides = (strides,) * nd if isinstance(strides, int) else tuple(strides)
    spatial = "DHW"[-nd:]
    numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("N" + spatial + "C", spatial + "IO",
                                                                     "N" + spatial + "C"))
    return jax.lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                        dimension_numbers=numbers, precision=None)


class Conv(nn.Module):
    """N-d convolution, channels last; ``kernel`` is (*window, in, out) = torch's weight moved to HWIO.

    ``padding`` is an int (symmetric, as torch's ``padding=``) or an explicit per-dimension list of (lo, hi).
    """
    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] | int = 1
    padding: Any = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        return apply_conv(self, x)


def apply_conv(module: nn.Module, x, padding: Any = None):
    """The convolution of ``module`` (a ``Conv`` or a module with the same fields: ``features``, ``kernel_size``,
    ``strides``, ``padding``, ``use_bias``, ``dtype``, ``param_dtype``, ``kernel_init``), creating its ``kernel`` and
    ``bias`` in ``module``'s scope; for modules that change the input first (``jaxvc.models.wan_vae.CausalConv3d``).
    ``padding`` overrides ``module.padding``."""
    nd = len(module.kernel_size)
    window_axes = ("kernel_t", "kernel_h", "kernel_w")[-nd:] if nd <= 3 else (None,) * nd
    kernel_axes = (*window_axes, "conv_in", "conv_out")
    kernel = module.param("kernel", nn.with_logical_partitioning(module.kernel_init, kernel_axes),
                          (*module.kernel_size, x.shape[-1], module.features), module.param_dtype)
    y = conv_nd(x.astype(module.dtype), kernel.astype(module.dtype), module.strides,
                module.padding if padding is None else padding)
    if module.use_bias:
        bias = module.param("bias", nn.with_logical_partitioning(zeros, ("conv_out",)), (module.features,),
                            module.param_dtype)
        y = y + bias.astype(module.dtype)
    return y


def _affine(module: nn.Module, y, with_bias: bool = True):
    """A norm's learned per-channel ``scale`` (and ``bias``), applied in float32 to y (..., C)."""
    features = y.shape[-1]
    scale = module.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (features,), module.param_dtype)
    y = y * scale.astype(jnp.float32)
    if with_bias:
        bias = module.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (features,), module.param_dtype)
        y = y + bias.astype(jnp.float32)
    return y


class GroupNorm(nn.Module):
    """GroupNorm over the channel (last) axis with float32 statistics and exact (two-pass) variance.

    Statistics span every axis but the batch (first) axis and the group: apply it to (B, F, H, W, C) to normalize
    across frames (diffusers' AnimateDiff motion module), to (B*F, H, W, C) for per-frame statistics.
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    use_affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm '{self.name}': {channels} channels are not divisible by "
                             f"{self.num_groups} groups")
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        reduce_axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = grouped.mean(axis=reduce_axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=reduce_axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if self.use_affine:
            y = _affine(self, y)
        return y.astype(self.dtype)


class EvalBatchNorm(nn.Module):
    """torch's ``BatchNorm{2,3}d`` in eval mode over the last (channel) axis, computed as torch's CPU kernel does:
    y = x * alpha + beta with alpha = scale / sqrt(running_var + eps), beta = bias - running_mean * alpha.

    The running statistics are leaves of ``params`` (named like torch's buffers) because nothing here trains them
    (the metrics' networks: I3D, RAFT's context encoder); the checkpoint's ``num_batches_tracked`` is not needed."""
    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]

        def leaf(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("norm",)), (features,), self.param_dtype)

        scale, bias = leaf("scale", ones), leaf("bias", zeros)
        mean, var = leaf("running_mean", zeros), leaf("running_var", ones)
        alpha = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.epsilon)
        beta = bias.astype(jnp.float32) - mean.astype(jnp.float32) * alpha
        return (x.astype(jnp.float32) * alpha + beta).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics; ``epsilon`` must be given (torch uses 1e-5)."""
    epsilon: float = 1e-5
    use_affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_affine:
            y = _affine(self, y)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis (Wan's q/k norms), float32 statistics."""
    epsilon: float = 1e-6
    use_affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
        if self.use_affine:
            y = _affine(self, y, with_bias=False)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Lookup table (torch ``nn.Embedding``); ``embedding`` is (num_embeddings, features)."""
    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                           (self.num_embeddings, self.features), self.param_dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)
