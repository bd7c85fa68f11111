"""One interface over jaxvc's two VAEs, for methods that may use either: the per-frame Stable Diffusion
``AutoencoderKL`` (``jaxvc/models/vae.py``: F frames -> F latent frames, scaled by ``scaling_factor``) and the causal
Wan video VAE (``jaxvc/models/wan_vae.py``: 1 + 4k frames -> 1 + k latent frames, normalized per channel).

``video_vae_config(name)`` reads the ``config.model.vae_variant`` names: ``none`` (pixel space), ``tiny``/``sd``
(SD sizes), ``wan_tiny``/``wan21``/``wan22`` (Wan sizes).
"""
from __future__ import annotations

import dataclasses

import jax
from flax import linen as nn

from jaxvc.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params, decode_video, encode_video
from jaxvc.models.wan_vae import (AutoencoderKLWan, WanVAEConfig, abstract_wan_vae_params, decode_wan_video,
                                  encode_wan_video, init_wan_vae)

WAN_NAMES = {"wan_tiny": "tiny", "wan21": "wan21", "wan22": "wan22"}


def video_vae_config(name: str) -> VAEConfig | WanVAEConfig | None:
    if name == "none":
        return None
    if name in WAN_NAMES:
        return WanVAEConfig.variant(WAN_NAMES[name])
    if name.startswith("wan"):
        raise ValueError(f"unknown Wan VAE size '{name}'; expected one of {sorted(WAN_NAMES)}")
    return VAEConfig.variant(name)


@dataclasses.dataclass(frozen=True)
class VideoVAE:
    """``config``: a ``VAEConfig`` or a ``WanVAEConfig``. ``chunk_frames``: the Wan VAE's frames per ``lax.scan``
    step (None: a whole clip at once); the SD VAE's frames per ``lax.map`` step. ``tile``/``tile_stride``: the Wan
    VAE codes frames in spatial tiles of ``tile`` px every ``tile_stride`` px (``jaxvc/models/wan_vae_tiling.py``;
    None: whole frames)."""
    config: VAEConfig | WanVAEConfig
    chunk_frames: int | None = None
    tile: int | None = None
    tile_stride: int = 192

    @property
    def is_wan(self) -> bool:
        return isinstance(self.config, WanVAEConfig)

    @property
    def module(self) -> AutoencoderKL | AutoencoderKLWan:
        return AutoencoderKLWan(self.config) if self.is_wan else AutoencoderKL(self.config)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a ``frames``-frame video (raises for a length the Wan VAE cannot code)."""
        return self.config.latent_frames(frames) if self.is_wan else frames

    def encode(self, params, video):
        """video (B, F, H, W, 3) in [-1, 1] -> the diffusion model's latents (B, F', h, w, c); ``params`` is the
        VAE's ``{"params": ...}``."""
        if self.is_wan:
            return encode_wan_video(self.module, params, video, chunk_frames=self.chunk_frames, **self._tiling())
        return encode_video(self.module, params, video, chunk=self.chunk_frames)

    def decode(self, params, latents):
        """The inverse of ``encode``: video in [-1, 1] (the SD VAE's output is clipped here too)."""
        if self.is_wan:
            return decode_wan_video(self.module, params, latents, chunk_frames=self.chunk_frames, **self._tiling())
        return decode_video(self.module, params, latents, chunk=self.chunk_frames).clip(-1.0, 1.0)

    def _tiling(self) -> dict:
        return {} if not self.tile else {"tile": self.tile, "stride": self.tile_stride}

    def init(self, rng) -> dict:
        """The VAE's parameter subtree (unboxed), randomly initialized."""
        if self.is_wan:
            return nn.unbox(init_wan_vae(self.config, rng))["params"]
        size = self.config.downsample_factor
        images = jax.numpy.zeros((1, size, size, self.config.in_channels))
        return nn.unbox(self.module.init(rng, images))["params"]

    def abstract_params(self) -> dict:
        """The boxed ShapeDtypeStruct parameter subtree."""
        return (abstract_wan_vae_params if self.is_wan else abstract_vae_params)(self.config)["params"]
