"""Benchmark sizes: named model sizes -> the jaxvc configs (UNet + motion modules, CLIP text, VAE) and the same
architecture in diffusers/transformers terms for the PyTorch reference.

``tiny``  the CPU-test topology (2-level UNet at width 32, v3-style adapter, tiny CLIP and VAE); CI-friendly.
``sd15``  Stable Diffusion 1.5 UNet + AnimateDiff v3 motion modules (``v3_sd15_mm``: no mid-block motion module,
          max_seq_length 32), SD 1.5's CLIP ViT-L/14 text tower and the SD VAE: the paper's setting.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxvc.models.clip_text import CLIPTextConfig
from jaxvc.models.unet import UNetConfig, unet_config
from jaxvc.models.vae import VAEConfig


@dataclasses.dataclass(frozen=True)
class BenchSize:
    name: str
    unet_variant: str
    text_variant: str
    vae_variant: str
    motion_layout: str
    frames: int                  # generated frames (the reference adds one more through the UNet)
    image_sizes: tuple[int, ...]  # pixel side lengths benchmarked by default
    batch: int


SIZES = {
    "tiny": BenchSize("tiny", "tiny", "tiny", "tiny", "v3", frames=4, image_sizes=(32,), batch=1),
    "sd15": BenchSize("sd15", "sd15", "sd15", "sd", "v3", frames=16, image_sizes=(256, 512), batch=1),
}


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    unet: UNetConfig
    text: CLIPTextConfig
    vae: VAEConfig


def model_configs(size: str, *, dtype: Any, attention_backend: str = "xla", remat: bool | str = False) -> ModelConfigs:
    """The jaxvc configs of a named size with the compute dtype, attention backend and remat policy applied."""
    if size not in SIZES:
        raise ValueError(f"unknown benchmark size '{size}'; known: {sorted(SIZES)}")
    spec = SIZES[size]
    side_backend = _side_backend(attention_backend)
    text = CLIPTextConfig.variant(spec.text_variant, dtype=dtype, attention_backend=side_backend)
    vae = VAEConfig.variant(spec.vae_variant, dtype=dtype, attention_backend=side_backend)
    unet = unet_config(spec.unet_variant, spec.motion_layout, in_channels=vae.latent_channels,
                       out_channels=vae.latent_channels, cross_attention_dim=text.hidden_size, dtype=dtype,
                       attention_backend=attention_backend, remat=remat)
    return ModelConfigs(unet, text, vae)


def _side_backend(backend: str) -> str:
    # cuDNN flash attention takes head dims <= 256 (Hopper; 128 before) in multiples of 8: the UNet's (40/80/160 at
    # SD size) fit, the VAE's single 512-wide head does not, and CLIP's 77 causal tokens gain nothing from it (nor
    # from the TPU's splash kernel, which takes lengths in multiples of 128). The VAE and the text tower therefore
    # keep the XLA attention whatever the UNet uses.
    return "xla" if backend in ("cudnn", "splash") else backend


# ----------------------------------------------------------------------------------- the same architecture in torch
def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """``diffusers.UNetMotionModel(**kwargs)`` for a jaxvc ``UNetConfig`` (same topology, random weights)."""
    if cfg.motion is None:
        raise ValueError("benchmark UNet needs motion modules")
    down = tuple("CrossAttnDownBlockMotion" if t.startswith("CrossAttn") else "DownBlockMotion"
                 for t in cfg.down_block_types)
    up = tuple("CrossAttnUpBlockMotion" if t.startswith("CrossAttn") else "UpBlockMotion" for t in cfg.up_block_types)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=down, up_block_types=up,
                block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
                cross_attention_dim=cfg.cross_attention_dim, num_attention_heads=cfg.attention_heads,
                transformer_layers_per_block=cfg.transformer_layers_per_block,
                use_linear_projection=cfg.use_linear_projection, downsample_padding=cfg.downsample_padding,
                mid_block_scale_factor=cfg.mid_block_scale_factor,
                motion_num_attention_heads=cfg.motion.heads, motion_max_seq_length=cfg.motion.max_seq_length,
                use_motion_mid_block=cfg.motion.use_mid_block,
                temporal_transformer_layers_per_block=cfg.motion.layers_per_block)


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
                block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, scaling_factor=cfg.scaling_factor,
                use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
                mid_block_add_attention=cfg.mid_block_add_attention)


def transformers_clip_kwargs(cfg: CLIPTextConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                layer_norm_eps=cfg.layer_norm_eps, eos_token_id=cfg.eos_token_id, bos_token_id=49406,
                pad_token_id=49407)
