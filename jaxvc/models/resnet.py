"""The Stable Diffusion UNet's (and VAE's) convolutional pieces: ResnetBlock2D, Downsample2D, Upsample2D.

Channels last, images (N, H, W, C); in the video UNet N = B*F (frames folded into the batch, (b f) order).
Numerics follow diffusers' ``ResnetBlock2D`` with ``pre_norm=True`` and SiLU:
GroupNorm -> SiLU -> conv1 -> (+ time_emb_proj(SiLU(temb))) -> GroupNorm -> SiLU -> conv2, then
``(shortcut + h) / output_scale_factor``. ``time_embedding_norm="scale_shift"`` (diffusers' UNet option
``resnet_time_scale_shift``) instead splits time_emb_proj's 2*C outputs into (scale, shift) and applies
``norm2(h) * (1 + scale) + shift``: the timestep can then gate features (FiLM), not only offset them.
Submodule names equal the torch keys (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut) so checkpoints map
mechanically.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.models.layers import Conv, Dense, GroupNorm, constrain

IMAGE_AXES = ("batch", "height", "width", "channels")
TIME_EMBEDDING_NORMS = ("default", "scale_shift")


class ResnetBlock2D(nn.Module):
    """x (N, H, W, Cin), temb (N, T) or None -> (N, H, W, out_channels).

    Without ``temb`` there is no ``time_emb_proj`` (the VAE's resnets). A 1x1 ``conv_shortcut`` appears when the
    channel count changes, as in diffusers (``use_in_shortcut`` defaults to ``in != out``).
    """
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    time_embedding_norm: str = "default"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(f"{self.name}: time_embedding_norm={self.time_embedding_norm!r}; expected one of "
                             f"{TIME_EMBEDDING_NORMS}")
        scale_shift = self.time_embedding_norm == "scale_shift"
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = nn.silu(h)
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv1", **kw)(h)
        t = None
        if temb is not None:  # (N, C), or (N, 2C) = [scale, shift] for scale_shift
            t = Dense(self.out_channels * (2 if scale_shift else 1), axes=("embed", "mlp"), name="time_emb_proj",
                      **kw)(nn.silu(temb))[:, None, None, :].astype(h.dtype)
            if not scale_shift:
                h = h + t
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        if t is not None and scale_shift:
            time_scale, time_shift = jnp.split(t, 2, axis=-1)
            h = h * (1 + time_scale) + time_shift
        h = nn.silu(h)
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv2", **kw)(h)
        shortcut = x
        if x.shape[-1] != self.out_channels:
            shortcut = Conv(self.out_channels, (1, 1), padding=0, name="conv_shortcut", **kw)(x)
        out = (shortcut.astype(h.dtype) + h)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return constrain(out, IMAGE_AXES)


class Downsample2D(nn.Module):
    """3x3 conv, stride 2 (the UNet's ``downsamplers.0.conv``, ``padding=1``): (N, H, W, C) -> (N, ceil(H/2), ...)."""
    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(self.out_channels, (3, 3), strides=2, padding=self.padding, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


def upsample_nearest(x, output_size: Sequence[int] | None = None):
    """torch ``F.interpolate(mode="nearest")`` on (N, H, W, C): source index = floor(dst * in / out).

    Without ``output_size`` it doubles H and W (a pure repeat). With it, any target size (the UNet passes the skip
    connection's size when the latent side is not divisible by 2**levels).
    """
    height, width = x.shape[1:3]
    out_h, out_w = (2 * height, 2 * width) if output_size is None else tuple(output_size)
    if (out_h, out_w) == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    # torch computes the scale and the product in float32 and clamps to the last source index
    rows = np.minimum(np.floor(np.arange(out_h, dtype=np.float32) * np.float32(height / out_h)), height - 1)
    cols = np.minimum(np.floor(np.arange(out_w, dtype=np.float32) * np.float32(width / out_w)), width - 1)
    return x[:, rows.astype(np.int32)][:, :, cols.astype(np.int32)]


class Upsample2D(nn.Module):
    """Nearest x2 (or to ``output_size``) followed by a 3x3 conv (``upsamplers.0.conv``)."""
    out_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Sequence[int] | None = None):
        x = upsample_nearest(x, output_size)  # (N, 2H, 2W, C) or (N, *output_size, C)
        return Conv(self.out_channels, (3, 3), padding=1, name="conv", dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


