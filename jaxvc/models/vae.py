"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax linen, channels last, plus frame-folding helpers.

Module names mirror the diffusers keys (``encoder/down_blocks_0/resnets_1/conv1``, ``decoder/mid_block/attentions_0/
to_out_0``, ``quant_conv``...) so that ``jaxvc/convert/vae.py`` maps a ``vae/`` folder mechanically.

The VAE's blocks differ from the UNet's (``jaxvc/models/resnet.py``) and live here: no time embedding, GroupNorm eps
1e-6 everywhere, the encoder downsampler pads right/bottom by one and convolves with padding 0, and the mid block has
a single-head self-attention with biases on every projection and its own ``group_norm``.

``encode`` returns the posterior's ``(mean, logvar)``; like diffusers, the model does not scale latents: the
pipeline-level helpers ``encode_video``/``decode_video`` apply ``scaling_factor`` (and ``shift_factor`` if set).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.attention import dot_product_attention
from jaxvc.models.layers import Conv, Dense, GroupNorm, constrain

VAE_EPS = 1e-6  # diffusers hard-codes eps=1e-6 for every GroupNorm in the SD VAE
IMAGE_AXES = ("batch", "height", "width", "channels")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL`` with ``DownEncoderBlock2D``/``UpDecoderBlock2D`` blocks (SD 1.x/2.x)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def variant(cls, name: str, **overrides) -> "VAEConfig":
        """Named sizes: ``"tiny"`` (CPU tests and the demo) and ``"sd"`` (the real SD 1.x/2.x VAE)."""
        if name not in VAE_VARIANTS:
            raise ValueError(f"unknown VAE variant '{name}'; expected one of {sorted(VAE_VARIANTS)}")
        return dataclasses.replace(VAE_VARIANTS[name], **overrides)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "VAEConfig":
        """From a diffusers ``vae/config.json`` dict; rejects block types or activations this module lacks."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"VAE config: _class_name is '{class_name}', expected 'AutoencoderKL'")
        block_out_channels = tuple(int(c) for c in config.get("block_out_channels", (64,)))
        levels = len(block_out_channels)
        for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(config.get(key, (expected,) * levels))
            if types != (expected,) * levels:
                raise ValueError(f"VAE config: {key} is {list(types)}, expected {levels} x '{expected}' "
                                 f"(one per entry of block_out_channels {list(block_out_channels)})")
        act = config.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"VAE config: act_fn '{act}' is not supported (expected 'silu')")
        if config.get("latents_mean") is not None or config.get("latents_std") is not None:
            raise ValueError("VAE config: per-channel latents_mean/latents_std normalisation is not supported "
                             "(only scaling_factor/shift_factor)")
        shift = config.get("shift_factor")
        kwargs = dict(
            in_channels=int(config.get("in_channels", 3)), out_channels=int(config.get("out_channels", 3)),
            latent_channels=int(config.get("latent_channels", 4)), block_out_channels=block_out_channels,
            layers_per_block=int(config.get("layers_per_block", 1)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)))
        kwargs.update(overrides)
        return cls(**kwargs)


VAE_VARIANTS = {
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    "sd": VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
}


class VAEResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding: norm1-SiLU-conv1-norm2-SiLU-conv2 + (1x1) shortcut."""
    out_channels: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, VAE_EPS, name="norm1", **kw)(x))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv1", **kw)(h)
        h = nn.silu(GroupNorm(self.groups, VAE_EPS, name="norm2", **kw)(h))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), padding=0, name="conv_shortcut", **kw)(x)
        return x.astype(h.dtype) + h


class VAEDownsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (``F.pad(x, (0, 1, 0, 1))``, then padding 0)."""
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(self.channels, (3, 3), strides=2, padding=[(0, 1), (0, 1)], name="conv",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)  # (N, H, W, C) -> (N, H/2, W/2, C)


class VAEUpsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (diffusers ``Upsample2D``)."""
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # (N, H, W, C) -> (N, 2H, 2W, C)
        return Conv(self.channels, (3, 3), padding=1, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with a residual: group_norm, to_q/to_k/to_v/to_out_0 (all with bias)."""
    groups: int
    backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, height, width, channels = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, VAE_EPS, name="group_norm", **kw)(x)
        h = h.reshape(n, height * width, channels)  # (N, H*W, C): every pixel is a token
        q, k, v = (Dense(channels, axes=("embed", "heads"), name=name, **kw)(h) for name in ("to_q", "to_k", "to_v"))
        one_head = lambda t: t[:, :, None, :]  # (N, H*W, 1, C); scale C**-0.5 as diffusers
        out = dot_product_attention(one_head(q), one_head(k), one_head(v), backend=self.backend)[:, :, 0, :]
        out = Dense(channels, axes=("heads", "embed"), name="to_out_0", **kw)(out)
        return x.astype(out.dtype) + out.reshape(n, height, width, channels)


class VAEMidBlock(nn.Module):
    """resnets_0 -> attentions_0 (optional) -> resnets_1, at the lowest resolution."""
    channels: int
    groups: int
    add_attention: bool = True
    backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VAEResnetBlock(self.channels, self.groups, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.backend, name="attentions_0", **kw)(x)
        return VAEResnetBlock(self.channels, self.groups, name="resnets_1", **kw)(x)


class VAEDownBlock(nn.Module):
    """``DownEncoderBlock2D``: ``num_layers`` resnets, then the asymmetric downsampler unless it is the last level."""
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = VAEResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = VAEDownsample(self.out_channels, name="downsamplers_0", **kw)(x)
        return constrain(x, IMAGE_AXES)


class VAEUpBlock(nn.Module):
    """``UpDecoderBlock2D``: ``num_layers`` resnets (no skip connections), then the upsampler unless it is last."""
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = VAEResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = VAEUpsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return constrain(x, IMAGE_AXES)


class VAEEncoder(nn.Module):
    """Images (N, H, W, in) -> posterior moments (N, H/f, W/f, 2*latent) (before ``quant_conv``)."""
    config: VAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        channels = cfg.block_out_channels
        x = Conv(channels[0], (3, 3), padding=1, name="conv_in", **kw)(x)
        for i, out_channels in enumerate(channels):
            x = VAEDownBlock(out_channels, cfg.layers_per_block, cfg.norm_num_groups,
                             add_downsample=i < len(channels) - 1, name=f"down_blocks_{i}", **kw)(x)
        x = VAEMidBlock(channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.attention_backend,
                        name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out", **kw)(x))
        return Conv(2 * cfg.latent_channels, (3, 3), padding=1, name="conv_out", **kw)(x)


class VAEDecoder(nn.Module):
    """Latents (N, h, w, latent) (after ``post_quant_conv``) -> images (N, h*f, w*f, out)."""
    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        reversed_channels = tuple(reversed(cfg.block_out_channels))
        x = Conv(reversed_channels[0], (3, 3), padding=1, name="conv_in", **kw)(z)
        x = VAEMidBlock(reversed_channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.attention_backend,
                        name="mid_block", **kw)(x)
        for i, out_channels in enumerate(reversed_channels):
            x = VAEUpBlock(out_channels, cfg.layers_per_block + 1, cfg.norm_num_groups,
                           add_upsample=i < len(reversed_channels) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out", **kw)(x))
        return Conv(cfg.out_channels, (3, 3), padding=1, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL autoencoder. Channels last: images (N, H, W, 3) in [-1, 1], latents (N, H/f, W/f, latent_channels)."""
    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), padding=0, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), padding=0, **kw)

    def encode(self, images):
        """images (N, H, W, in) -> (mean, logvar), each (N, H/f, W/f, latent) float32; logvar clamped to [-30, 20]."""
        self._check_input(images, self.config.in_channels, "images")
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # diffusers chunks [mean, logvar] along channels
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """latents (N, h, w, latent) (unscaled) -> images (N, h*f, w*f, out) float32."""
        self._check_input(latents, self.config.latent_channels, "latents")
        z = latents.astype(self.config.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images, rng=None):
        """Reconstruction through the posterior mean (or a sample when ``rng`` is given); used for init too."""
        mean, logvar = self.encode(images)
        z = mean if rng is None else sample_posterior(mean, logvar, rng)
        return self.decode(z), mean, logvar

    def _check_input(self, x, channels: int, what: str):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL: {what} must be (N, H, W, {channels}) channels-last, got {x.shape}")
        factor = self.config.downsample_factor
        if what == "images" and (x.shape[1] % factor or x.shape[2] % factor):
            raise ValueError(f"AutoencoderKL: image size {x.shape[1]}x{x.shape[2]} is not divisible by the "
                             f"downsampling factor {factor}")


def sample_posterior(mean, logvar, rng):
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, 1) (diffusers ``DiagonalGaussianDistribution.sample``)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def abstract_vae_params(config: VAEConfig):
    """The boxed ShapeDtypeStruct tree of ``{"params": ...}`` without running an initialiser."""
    size = config.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)


def _map_in_chunks(fn, x, chunk: int | None):
    """fn over the leading axis of x in chunks of ``chunk`` rows (``lax.map``), bounding peak activation memory."""
    total = x.shape[0]
    if chunk is None or chunk >= total:
        return fn(x)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of frames, got {chunk}")
    num_chunks = -(-total // chunk)
    padded = jnp.pad(x, [(0, num_chunks * chunk - total)] + [(0, 0)] * (x.ndim - 1))  # zero frames, dropped below
    out = jax.lax.map(fn, padded.reshape(num_chunks, chunk, *x.shape[1:]))  # (chunks, chunk, ...)
    return jax.tree.map(lambda y: y.reshape(num_chunks * chunk, *y.shape[2:])[:total], out)


def encode_video(vae: AutoencoderKL, params, video, rng=None, sample: bool = False, chunk: int | None = None):
    """video (B, F, H, W, in) in [-1, 1] -> scaled latents (B, F, H/f, W/f, latent), frame by frame.

    Returns ``(mean or posterior sample - shift_factor) * scaling_factor`` (the diffusion model's latent space).
    ``chunk``: frames encoded at once (``None``: all B*F together).
    """
    if video.ndim != 5:
        raise ValueError(f"encode_video: video must be (B, F, H, W, C), got {video.shape}")
    if sample and rng is None:
        raise ValueError("encode_video: sample=True needs an rng")
    b, f = video.shape[:2]
    frames = video.reshape(b * f, *video.shape[2:])  # (B*F, H, W, C), frame index fastest
    mean, logvar = _map_in_chunks(lambda x: vae.apply(params, x, method=AutoencoderKL.encode), frames, chunk)
    z = sample_posterior(mean, logvar, rng) if sample else mean
    cfg = vae.config
    if cfg.shift_factor is not None:
        z = z - cfg.shift_factor
    z = z * cfg.scaling_factor
    return z.reshape(b, f, *z.shape[1:])  # (B, F, h, w, latent)


def decode_video(vae: AutoencoderKL, params, latents, chunk: int | None = None):
    """Scaled latents (B, F, h, w, latent) -> video (B, F, h*f, w*f, out), frame by frame (inverse scaling first)."""
    if latents.ndim != 5:
        raise ValueError(f"decode_video: latents must be (B, F, h, w, C), got {latents.shape}")
    cfg = vae.config
    b, f = latents.shape[:2]
    z = latents.reshape(b * f, *latents.shape[2:]) / cfg.scaling_factor  # (B*F, h, w, latent)
    if cfg.shift_factor is not None:
        z = z + cfg.shift_factor
    images = _map_in_chunks(lambda x: vae.apply(params, x, method=AutoencoderKL.decode), z, chunk)
    return images.reshape(b, f, *images.shape[1:])  # (B, F, H, W, out)
