"""The Wan 2.1 / 2.2 video VAE (diffusers ``AutoencoderKLWan``) in Flax linen, channels last, streamed in chunks.

Videos (B, T, H, W, 3) in [-1, 1] with T = 1 + 4k frames become latents (B, 1 + k, H/f, W/f, z_dim): frame 0 is
coded alone (an image is a 1-frame video), each later 4 frames make one latent frame. f = 8 (Wan 2.1: 16 channels)
or 16 (Wan 2.2: a 2x2 patchify of the pixels, then 8; 48 channels, residual blocks with averaging/duplicating
shortcuts). Every convolution is causal in time: its ``2 * padding_t`` frames of time padding are all in front.

Streaming, as diffusers does it: the encoder sees frame 0, then chunks of 4 frames; the decoder one latent frame at a
time; each causal conv carries the last frames it saw into the next chunk (diffusers' ``feat_cache``). Here that
carry is the ``cache`` variable collection: one chunk is one ``apply(..., mutable=["cache"])``, the first chunk (one
frame) with ``first_chunk=True``, which starts every carry at zeros (the causal zero padding). Frame 0 is special in
three places, as in diffusers:
  * a temporal downsampler passes it through; each later chunk's stride-2 time conv starts from the previous
    chunk's last frame (frame 0 for the second chunk);
  * a temporal upsampler passes it through undoubled; the next chunk's time conv sees zeros before it, not frame 0;
  * Wan 2.2's duplicating shortcut drops the first copy of it.
Because each carry is exact, the chunk length is free: ``encode_wan``/``decode_wan`` run frame 0, then the rest at
once or as a ``lax.scan`` over equal chunks (memory bounded by one chunk). Both equal diffusers to float rounding
(tests/test_wan_vae_parity.py). Large frames can also be cut into spatial tiles (``wan_vae_tiling.py``).

Sharding: the outputs of the residual, attention, resample and level blocks and of the encoder's/decoder's input and
output convs, all (B, T, H, W, C), are constrained to ``VIDEO_AXES`` (batch over the data axes, frames over
sequence; a no-op outside ``jaxvc.parallel.mesh.activate``). A constraint only places data: the caches hold the same
values, and a sharded chunked run equals the single-device one (tests/test_t5_wan_vae_sharded.py).

Parameter paths mirror diffusers' keys (``decoder/up_blocks_1/resnets_0/conv1/kernel`` <->
``decoder.up_blocks.1.resnets.0.conv1.weight``); ``jaxvc.convert.wan_vae`` loads a ``vae/`` folder or the original
``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``. Latents are normalized per channel with ``latents_mean``/``latents_std``
as Wan's pipelines do.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.attention import dot_product_attention
from jaxvc.models.layers import VIDEO_AXES, Conv, Dense, apply_conv, constrain, ones

# diffusers' AutoencoderKLWan defaults: the Wan 2.1 VAE's per-channel latent statistics
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# the Wan 2.2 VAE's (48 channels): its original file does not hold them; these are the values of Wan2.2's
# ``Wan2_2_VAE`` (wan/modules/vae2_2.py) and of the Wan2.2-TI2V-5B-Diffusers vae/config.json.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """The fields of diffusers' ``AutoencoderKLWan`` config.json (same names; ``temperal_`` is diffusers' spelling).

    latents_mean/latents_std: None where unknown (a folder's config.json or a size entry supplies them).
    """
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    latents_mean: tuple[float, ...] | None = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] | None = WAN21_LATENTS_STD
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"WanVAEConfig: temperal_downsample {list(self.temperal_downsample)} needs one entry per "
                             f"downsampling level ({len(self.dim_mult) - 1} for dim_mult {list(self.dim_mult)})")
        if self.attn_scales:
            # diffusers' streaming encoder cannot run them either (its attention blocks take no cache); no released
            # Wan VAE has any
            raise ValueError(f"WanVAEConfig: attn_scales {list(self.attn_scales)} (attention inside the encoder's "
                             "levels) is not supported")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.z_dim:
                raise ValueError(f"WanVAEConfig: {name} has {len(value)} entries, expected z_dim = {self.z_dim}")

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for Wan 2.1, 16 for Wan 2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    def latent_frames(self, frames: int) -> int:
        """1 + (frames - 1) / temporal_factor; raises unless frames = 1 + k * temporal_factor."""
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise ValueError(f"the Wan VAE codes 1 + {self.temporal_factor}k frames (1, {1 + self.temporal_factor}, "
                             f"{1 + 2 * self.temporal_factor}, ...), got {frames}")
        return 1 + (frames - 1) // self.temporal_factor

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_factor

    @classmethod
    def variant(cls, name: str, **overrides) -> "WanVAEConfig":
        if name not in WAN_VAE_VARIANTS:
            raise ValueError(f"unknown Wan VAE variant '{name}'; expected one of {sorted(WAN_VAE_VARIANTS)}")
        return dataclasses.replace(WAN_VAE_VARIANTS[name], **overrides)


WAN_VAE_VARIANTS = {
    # CPU tests and tiny configs: both temporal levels, 4x spatial, and no latent statistics to learn
    "tiny": WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True),
                         latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
    "wan21": WanVAEConfig(),  # Wan2.1-*-Diffusers/vae (also Wan 2.2 A14B)
    "wan22": WanVAEConfig(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                          out_channels=12, patch_size=2, latents_mean=WAN22_LATENTS_MEAN,
                          latents_std=WAN22_LATENTS_STD),  # Wan2.2-TI2V-5B
}


class WanVAENorm(nn.Module):
    """diffusers' ``WanRMS_norm``: x / max(|x|_2, 1e-12) * sqrt(C) * gamma over the channels, in float32."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(ones, ("norm",)), (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        length = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        return (x32 / jnp.maximum(length, 1e-12) * channels ** 0.5 * gamma.astype(jnp.float32)).astype(self.dtype)


class CausalConv3d(nn.Module):
    """torch ``Conv3d`` on (B, T, H, W, C) whose time padding (``2 * padding[0]`` frames) is all in front: the last
    frames of the previous chunk (``cache/context``), zeros on the first chunk. ``skip=True``: not applied to this
    chunk, and the next chunk sees zeros (a temporal upsampler's frame 0)."""
    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    padding: tuple[int, int, int] = (1, 1, 1)
    strides: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, first_chunk: bool, skip: bool = False):
        context = 2 * self.padding[0]
        if context:
            b, _, h, w, c = x.shape
            cache = self.variable("cache", "context", jnp.zeros, (b, context, h, w, c), x.dtype)
            if skip:
                cache.value = jnp.zeros_like(cache.value)
                return x
            previous = jnp.zeros_like(cache.value) if first_chunk else cache.value
            x = jnp.concatenate([previous.astype(x.dtype), x], axis=1)  # (B, context + T, H, W, C)
            cache.value = x[:, -context:]
        return apply_conv(self, x, padding=[(0, 0), (self.padding[1],) * 2, (self.padding[2],) * 2])


def _per_frame(fn, x):
    """fn over each frame: (B, T, H, W, C) -> (B*T, H, W, C) -> fn -> (B, T, H', W', C')."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class Resample(nn.Module):
    """diffusers' ``WanResample``: 2x spatial up/down per frame, and for the ``*3d`` modes 2x in time."""
    dim: int
    mode: str  # upsample2d, upsample3d, downsample2d, downsample3d
    out_dim: int | None = None  # the upsamplers' conv output (Wan 2.1: dim // 2)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first_chunk: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            time_conv = CausalConv3d(2 * self.dim, (3, 1, 1), (1, 0, 0), name="time_conv", **kw)
            if first_chunk:
                time_conv(x, first_chunk, skip=True)
            else:
                x = time_conv(x, first_chunk)  # (B, T, H, W, 2C): channels [s*C, (s+1)*C) are output frame 2i + s
                x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("upsample"):
            conv = Conv(self.out_dim or self.dim // 2, (3, 3), padding=1, name="resample_1", **kw)
            nearest = lambda f: jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2)  # nearest-exact at 2x
            return constrain(_per_frame(lambda f: conv(nearest(f)), x), VIDEO_AXES)  # (B, T', 2H, 2W, C')
        conv = Conv(self.dim, (3, 3), strides=2, padding=[(0, 1), (0, 1)], name="resample_1", **kw)
        x = _per_frame(conv, x)  # ZeroPad2d((0, 1, 0, 1)) then a stride-2 conv
        if self.mode == "downsample3d":
            last_frame = self.variable("cache", "last_frame", jnp.zeros, (b, 1, *x.shape[2:]), x.dtype)
            chunk = x
            if not first_chunk:  # windows (2j-2, 2j-1, 2j): the previous chunk's last frame starts the first one
                x = Conv(self.dim, (3, 1, 1), strides=(2, 1, 1), padding=0, name="time_conv", **kw)(
                    jnp.concatenate([last_frame.value.astype(x.dtype), chunk], axis=1))
            last_frame.value = chunk[:, -1:]
        return constrain(x, VIDEO_AXES)  # (B, T', H/2, W/2, C)


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1x1 conv) shortcut."""
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first_chunk: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = x
        if x.shape[-1] != self.out_dim:
            shortcut = CausalConv3d(self.out_dim, (1, 1, 1), (0, 0, 0), name="conv_shortcut", **kw)(x, first_chunk)
        x = nn.silu(WanVAENorm(name="norm1", **kw)(x))
        x = CausalConv3d(self.out_dim, name="conv1", **kw)(x, first_chunk)
        x = nn.silu(WanVAENorm(name="norm2", **kw)(x))
        x = CausalConv3d(self.out_dim, name="conv2", **kw)(x, first_chunk)
        return constrain(x + shortcut.astype(x.dtype), VIDEO_AXES)


class AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels (scale C^-1/2), with a residual."""
    backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first_chunk: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, h, w, c = x.shape
        tokens = WanVAENorm(name="norm", **kw)(x).reshape(b * t, h * w, c)  # (B*T, H*W, C)
        qkv = Dense(3 * c, axes=("embed", "heads"), name="to_qkv", **kw)(tokens)
        q, k, v = (part[:, :, None, :] for part in jnp.split(qkv, 3, axis=-1))  # (B*T, H*W, 1, C) each
        out = dot_product_attention(q, k, v, backend=self.backend)[:, :, 0, :]
        out = Dense(c, axes=("heads", "embed"), name="proj", **kw)(out)
        return constrain(x.astype(out.dtype) + out.reshape(b, t, h, w, c), VIDEO_AXES)


class MidBlock(nn.Module):
    dim: int
    backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first_chunk: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResidualBlock(self.dim, name="resnets_0", **kw)(x, first_chunk)
        x = AttentionBlock(self.backend, name="attentions_0", **kw)(x)
        return ResidualBlock(self.dim, name="resnets_1", **kw)(x, first_chunk)


def average_down(x, out_channels: int, factor_t: int, factor_s: int):
    """Wan 2.2's ``AvgDown3D`` shortcut: (B, T, H, W, C) -> (B, ceil(T/ft), H/fs, W/fs, out) by folding each
    ft x fs x fs block into channels and averaging groups of them; T is zero-padded in front to a multiple of ft."""
    pad_t = (factor_t - x.shape[1] % factor_t) % factor_t
    x = jnp.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # (B, T', H', W', C, ft, fs, fs): torch's channel order c*f + offset
    x = x.reshape(*x.shape[:4], out_channels, -1)
    return x.astype(jnp.float32).mean(-1).astype(x.dtype)


def duplicate_up(x, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool):
    """Wan 2.2's ``DupUp3D`` shortcut, the inverse fold: each channel repeated, unfolded into ft x fs x fs blocks;
    on the first chunk the first ft - 1 frames are dropped (frame 0 is not doubled)."""
    b, t, h, w, c = x.shape
    repeats = out_channels * factor_t * factor_s * factor_s // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_channels, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_channels)
    return x[:, factor_t - 1:] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """Wan 2.2's encoder level: residual blocks, the downsampler, plus the averaging shortcut of the level's input."""
    out_dim: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first_chunk: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = average_down(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
        for j in range(self.num_res_blocks):
            x = ResidualBlock(self.out_dim, name=f"resnets_{j}", **kw)(x, first_chunk)
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            x = Resample(self.out_dim, mode, name="downsampler", **kw)(x, first_chunk)
        return constrain(x + shortcut.astype(x.dtype), VIDEO_AXES)


class UpBlock(nn.Module):
    """A decoder level: num_res_blocks + 1 residual blocks, then the upsampler (``upsamplers_0``; Wan 2.2:
    ``upsampler`` with the duplicating shortcut of the level's input added)."""
    out_dim: int
    num_res_blocks: int
    mode: str | None  # upsample2d / upsample3d / None
    residual: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first_chunk: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        level_input = x
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, name=f"resnets_{j}", **kw)(x, first_chunk)
        if self.mode is None:
            return x
        if not self.residual:
            return Resample(self.out_dim, self.mode, name="upsamplers_0", **kw)(x, first_chunk)
        x = Resample(self.out_dim, self.mode, out_dim=self.out_dim, name="upsampler", **kw)(x, first_chunk)
        factor_t = 2 if self.mode == "upsample3d" else 1
        return constrain(x + duplicate_up(level_input, self.out_dim, factor_t, 2, first_chunk).astype(x.dtype),
                         VIDEO_AXES)


class WanEncoder3d(nn.Module):
    config: WanVAEConfig

    @nn.compact
    def __call__(self, x, first_chunk: bool):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        x = constrain(CausalConv3d(dims[0], name="conv_in", **kw)(x, first_chunk), VIDEO_AXES)
        levels, index = len(cfg.dim_mult), 0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == levels - 1
            temporal = (not last) and bool(cfg.temperal_downsample[i])
            if cfg.is_residual:
                x = ResidualDownBlock(out_dim, cfg.num_res_blocks, temporal, not last, name=f"down_blocks_{i}",
                                      **kw)(x, first_chunk)
                continue
            # Wan 2.1: one flat list of residual blocks and downsamplers
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, name=f"down_blocks_{index}", **kw)(x, first_chunk)
                index += 1
            if not last:
                mode = "downsample3d" if temporal else "downsample2d"
                x = Resample(out_dim, mode, name=f"down_blocks_{index}", **kw)(x, first_chunk)
                index += 1
        x = MidBlock(dims[-1], cfg.attention_backend, name="mid_block", **kw)(x, first_chunk)
        x = nn.silu(WanVAENorm(name="norm_out", **kw)(x))
        x = CausalConv3d(2 * cfg.z_dim, name="conv_out", **kw)(x, first_chunk)  # (B, T', h, w, 2 z): mean, logvar
        return constrain(x, VIDEO_AXES)


class WanDecoder3d(nn.Module):
    config: WanVAEConfig

    @nn.compact
    def __call__(self, z, first_chunk: bool):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        x = constrain(CausalConv3d(dims[0], name="conv_in", **kw)(z, first_chunk), VIDEO_AXES)
        x = MidBlock(dims[0], cfg.attention_backend, name="mid_block", **kw)(x, first_chunk)
        levels = len(cfg.dim_mult)
        for i, out_dim in enumerate(dims[1:]):
            mode = None
            if i != levels - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            x = UpBlock(out_dim, cfg.num_res_blocks, mode, cfg.is_residual, name=f"up_blocks_{i}", **kw)(
                x, first_chunk)
        x = nn.silu(WanVAENorm(name="norm_out", **kw)(x))
        return constrain(CausalConv3d(cfg.out_channels, name="conv_out", **kw)(x, first_chunk), VIDEO_AXES)


def patchify(x, patch: int | None):
    """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p) with diffusers' channel order c*p*p + col*p + row."""
    if not patch or patch == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(b, t, h // patch, w // patch, c * patch * patch)


def unpatchify(x, patch: int | None):
    if not patch or patch == 1:
        return x
    b, t, h, w, cp = x.shape
    c = cp // (patch * patch)
    x = x.reshape(b, t, h, w, c, patch, patch).transpose(0, 1, 2, 6, 3, 5, 4)  # (B, T, h, row, w, col, C)
    return x.reshape(b, t, h * patch, w * patch, c)


class AutoencoderKLWan(nn.Module):
    """Encoder, ``quant_conv``, ``post_quant_conv``, decoder. One call of ``encode_chunk``/``decode_chunk`` is one
    chunk (mutable ``cache``); ``encode_wan``/``decode_wan`` below run whole videos."""
    config: WanVAEConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder = WanEncoder3d(cfg)
        self.decoder = WanDecoder3d(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), (0, 0, 0), **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), (0, 0, 0), **kw)

    def encode_chunk(self, video, first_chunk: bool):
        """A chunk of the patchified video (B, T, H/p, W/p, in) -> moments (B, T', h, w, 2 z) float32: the
        posterior's mean and log-variance (``posterior``)."""
        return self.quant_conv(self.encoder(video, first_chunk), first_chunk).astype(jnp.float32)

    def decode_chunk(self, latents, first_chunk: bool):
        """A chunk of latents (B, T', h, w, z) (not normalized) -> the decoder's output (B, T, H/p, W/p, out)
        float32, before un-patchifying and clipping (tiles are blended there, as diffusers does)."""
        return self.decoder(self.post_quant_conv(latents.astype(self.config.dtype), first_chunk),
                            first_chunk).astype(jnp.float32)

    def __call__(self, video):
        """Reconstruction through the posterior mean, in two chunks (frame 0, the rest); used for init."""
        video = patchify(video, self.config.patch_size)
        first = posterior(self.encode_chunk(video[:, :1], True))[0]
        rest = posterior(self.encode_chunk(video[:, 1:], False))[0]
        out = jnp.concatenate([self.decode_chunk(first, True), self.decode_chunk(rest, False)], axis=1)
        return finish_video(out, self.config)


def posterior(moments):
    """moments (..., 2 z) -> (mean, logvar), logvar clamped to [-30, 20] (diffusers' DiagonalGaussianDistribution)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def finish_video(decoded, config: WanVAEConfig):
    """The decoder's output -> video in [-1, 1]: un-patchified (Wan 2.2) and clipped."""
    return jnp.clip(unpatchify(decoded, config.patch_size), -1.0, 1.0)


def _strip_cache(variables) -> dict:
    return {"params": variables["params"]}


def _run_chunks(vae: AutoencoderKLWan, params, x, method, chunk: int | None, step: int):
    """``method`` over x (B, T, ...) as frame 0, then the rest: at once, or ``lax.scan`` over chunks of ``chunk``
    frames (a multiple of ``step``) plus one shorter chunk for what is left. Outputs concatenated along time."""
    if chunk is not None and (chunk < step or chunk % step):
        raise ValueError(f"Wan VAE: chunk of {chunk} frames is not a positive multiple of {step}")
    variables = _strip_cache(params)
    first, state = vae.apply(variables, x[:, :1], True, method=method, mutable=["cache"])
    rest = x[:, 1:]
    total = rest.shape[1]
    if total == 0:
        return first
    pieces = [first]
    cache = state["cache"]
    full = 0 if chunk is None or chunk >= total else total // chunk
    if full:
        chunks = rest[:, :full * chunk].reshape(rest.shape[0], full, chunk, *rest.shape[2:]).swapaxes(0, 1)

        def scan_step(cache, piece):  # piece (B, chunk, ...)
            out, new_state = vae.apply({**variables, "cache": cache}, piece, False, method=method,
                                       mutable=["cache"])
            return new_state["cache"], out

        cache, outs = jax.lax.scan(scan_step, cache, chunks)  # outs: (full, B, chunk', ...) per output
        pieces.append(jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(y.shape[1], -1, *y.shape[3:]), outs))
    if full * (chunk or 0) < total:
        out, _ = vae.apply({**variables, "cache": cache}, rest[:, full * (chunk or 0):], False, method=method,
                           mutable=["cache"])
        pieces.append(out)
    return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *pieces)


def check_video(cfg: WanVAEConfig, video) -> None:
    """Raises unless video is (B, 1 + 4k, H, W, 3) with H and W multiples of the downsampling factor."""
    channels = cfg.in_channels // (cfg.patch_size or 1) ** 2
    if video.ndim != 5 or video.shape[-1] != channels:
        raise ValueError(f"Wan VAE: video must be (B, T, H, W, {channels}) channels-last, got {video.shape}")
    cfg.latent_frames(video.shape[1])
    if video.shape[2] % cfg.downsample_factor or video.shape[3] % cfg.downsample_factor:
        raise ValueError(f"Wan VAE: frame size {video.shape[2]}x{video.shape[3]} is not divisible by the "
                         f"downsampling factor {cfg.downsample_factor}")


def check_latents(cfg: WanVAEConfig, latents) -> None:
    if latents.ndim != 5 or latents.shape[-1] != cfg.z_dim:
        raise ValueError(f"Wan VAE: latents must be (B, T, h, w, {cfg.z_dim}), got {latents.shape}")


def encode_wan(vae: AutoencoderKLWan, params, video, chunk_frames: int | None = None):
    """video (B, T, H, W, in) in [-1, 1], T = 1 + 4k -> posterior (mean, logvar), each (B, 1 + k, H/f, W/f, z).

    ``chunk_frames``: video frames (after frame 0) encoded per step of a ``lax.scan`` (a multiple of 4; diffusers
    uses 4); None encodes them all at once (fastest, most memory)."""
    check_video(vae.config, video)
    moments = _run_chunks(vae, params, patchify(video, vae.config.patch_size), AutoencoderKLWan.encode_chunk,
                          chunk_frames, vae.config.temporal_factor)
    return posterior(moments)


def decode_wan(vae: AutoencoderKLWan, params, latents, chunk_frames: int | None = None):
    """latents (B, 1 + k, h, w, z) (not normalized) -> video (B, 1 + 4k, h*f, w*f, out) in [-1, 1].

    ``chunk_frames``: latent frames (after the first) decoded per scan step (diffusers: 1); None: all at once."""
    check_latents(vae.config, latents)
    decoded = _run_chunks(vae, params, latents, AutoencoderKLWan.decode_chunk, chunk_frames, 1)
    return finish_video(decoded, vae.config)


def _latent_statistics(cfg: WanVAEConfig):
    if cfg.latents_mean is None or cfg.latents_std is None:
        raise ValueError("Wan VAE: latents_mean/latents_std are unknown for this size; load the VAE from a diffusers "
                         "folder whose config.json holds them")
    return jnp.asarray(cfg.latents_mean, jnp.float32), jnp.asarray(cfg.latents_std, jnp.float32)


def encode_wan_video(vae: AutoencoderKLWan, params, video, rng=None, sample: bool = False,
                     chunk_frames: int | None = None, tile: int | None = None, stride: int = 192):
    """Normalized latents (z - latents_mean) / latents_std of video (the Wan DiT's latent space), as Wan's pipelines.
    ``tile``: code the frames in spatial tiles of that many px every ``stride`` (``wan_vae_tiling``)."""
    if tile:
        from jaxvc.models.wan_vae_tiling import encode_wan_tiled

        mean, logvar = encode_wan_tiled(vae, params, video, tile=tile, stride=stride, chunk_frames=chunk_frames)
    else:
        mean, logvar = encode_wan(vae, params, video, chunk_frames)
    if sample:
        if rng is None:
            raise ValueError("encode_wan_video: sample=True needs an rng")
        mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    latents_mean, latents_std = _latent_statistics(vae.config)
    return (mean - latents_mean) / latents_std


def decode_wan_video(vae: AutoencoderKLWan, params, latents, chunk_frames: int | None = None,
                     tile: int | None = None, stride: int = 192):
    """Video in [-1, 1] from normalized latents (the inverse of ``encode_wan_video``'s normalization, then decode)."""
    latents_mean, latents_std = _latent_statistics(vae.config)
    latents = latents.astype(jnp.float32) * latents_std + latents_mean
    if tile:
        from jaxvc.models.wan_vae_tiling import decode_wan_tiled

        return decode_wan_tiled(vae, params, latents, tile=tile, stride=stride, chunk_frames=chunk_frames)
    return decode_wan(vae, params, latents, chunk_frames)


def init_wan_vae(config: WanVAEConfig, rng) -> dict:
    """``{"params": ...}`` of a randomly initialized VAE (tests, tiny configs)."""
    size = config.downsample_factor
    video = jnp.zeros((1, 1 + config.temporal_factor, size, size, config.in_channels // (config.patch_size or 1) ** 2))
    return _strip_cache(AutoencoderKLWan(config).init(rng, video))


def abstract_wan_vae_params(config: WanVAEConfig):
    """The boxed ShapeDtypeStruct tree of ``{"params": ...}`` without running an initialiser."""
    return jax.eval_shape(lambda: init_wan_vae(config, jax.random.key(0)))
