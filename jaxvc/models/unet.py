"""The inflated SD UNet: diffusers ``UNet2DConditionModel`` + AnimateDiff motion modules (= ``UNetMotionModel``).

Input latents (B, F, H, W, C_in) channels last. Spatial layers see (B*F, H, W, C) with frames folded into the batch
in (b f) order; each motion module sees the video (B, F, H, W, C) and attends across frames. The timestep embedding
is repeated per frame; the text context (B, L, D) is attended once per video (see ``transformer2d.py``), which is
what diffusers computes with the context repeated per frame.

``motion=None`` gives the plain 2-D UNet applied to every frame independently (``UNet2DConditionModel``).

Parameter paths mirror the diffusers keys (``down_blocks_0/resnets_1/conv1/kernel`` <->
``down_blocks.0.resnets.1.conv1.weight``), so ``jaxvc.convert.unet`` loads diffusers folders mechanically.
``UNetConfig.from_diffusers`` translates diffusers' config.json (implemented in ``jaxvc.convert.unet``); named sizes
are in ``VARIANTS`` / ``MOTION_LAYOUTS`` (``unet_config("sd15", motion="v2")``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.embeddings import (TextTimeEmbedding, TimestepEmbedding, sinusoidal_positions_2d,
                                     timestep_embedding)
from jaxvc.models.layers import VIDEO_AXES, Conv, Dense, GroupNorm, constrain, zeros
from jaxvc.models.motion import MotionModule
from jaxvc.models.resnet import IMAGE_AXES, TIME_EMBEDDING_NORMS, Downsample2D, ResnetBlock2D, Upsample2D
from jaxvc.models.transformer2d import Transformer2DModel
from jaxvc.train.compute import remat, remat_policy

DOWN_TYPES = {"CrossAttnDownBlock2D": "CrossAttnDownBlock2D", "CrossAttnDownBlockMotion": "CrossAttnDownBlock2D",
              "DownBlock2D": "DownBlock2D", "DownBlockMotion": "DownBlock2D"}
UP_TYPES = {"CrossAttnUpBlock2D": "CrossAttnUpBlock2D", "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D",
            "UpBlock2D": "UpBlock2D", "UpBlockMotion": "UpBlock2D"}


class UnsupportedConfigError(ValueError):
    """A diffusers config option jaxvc's UNet does not implement; the message names the option and its value."""


def _per_block(value, count: int, name: str) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * count
    value = tuple(value)
    if len(value) != count:
        raise ValueError(f"UNet config: '{name}' has {len(value)} entries, expected one per block ({count})")
    return value


@dataclasses.dataclass(frozen=True)
class MotionConfig:
    """AnimateDiff motion modules (a diffusers ``MotionAdapter``).

    heads: attention heads per down level (int or tuple; up levels use the reversed tuple, the mid block the last).
    layers_per_block: temporal transformer blocks inside each motion module (diffusers
        ``motion_transformer_layers_per_block``; 1 in every released AnimateDiff). The number of motion modules per
        UNet level always equals the UNet's ``layers_per_block`` (+1 in up blocks).
    max_seq_length: the longest clip the adapter accepts (24 for v1, 32 for v2/v3).
    norm_num_groups: None = the UNet's ``norm_num_groups``, which is what diffusers' UNetMotionModel uses.
    use_mid_block: a motion module in the mid block (v2).
    norm_over_frames: GroupNorm statistics across frames (diffusers, default) or per frame (original AnimateDiff).
    frame_time_embedding: add a learned embedding of the frame index (sinusoidal -> MLP, as the timestep's) to each
        frame's timestep embedding, so every resnet knows which frame it draws. Not in AnimateDiff (its only frame
        position is inside the motion modules' attention, where it can change attention weights but not add to
        a frame's features); for models trained from scratch. With VideoMaker's reference appended, the reference
        is frame index F.
    text_cross_attention: the second attention of every temporal block attends to the text instead of the frames
        (as LVDM / VideoCrafter temporal transformers without ``only_self_att``): the caption's words reach the
        layer that relates frames, with each frame's position in its query. Not in AnimateDiff.
    """
    heads: int | tuple[int, ...] = 8
    layers_per_block: int = 1
    max_seq_length: int = 32
    norm_num_groups: int | None = None
    use_mid_block: bool = True
    mid_layers_per_block: int = 1
    norm_over_frames: bool = True
    frame_time_embedding: bool = False
    text_cross_attention: bool = False


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Sizes and switches of ``UNetMotion``. ``attention_heads`` is the number of heads (SD's legacy
    ``attention_head_dim``), an int or one per level."""
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_heads: int | tuple[int, ...] = 8
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_time_scale_shift: str = "default"  # "scale_shift": the timestep scales and shifts each resnet's norm2
    addition_embed_type: str | None = None  # "text": + TextTimeEmbedding(text tokens) on the timestep embedding
    addition_embed_type_num_heads: int = 64
    # + a learned projection (zero at init) of a 2-D sin-cos table of the pixel position after conv_in: absolute
    # position for models trained from scratch, whose only other position cue is the convolutions' zero padding
    spatial_position_embedding: bool = False
    # with reference injection: leave the position embedding off the reference frame, so PISA matches reference
    # tokens to video tokens by what they show, not by where they are (the subject moves; the reference is centred)
    position_free_reference: bool = False
    # with reference injection: + the reference frame itself, flattened, through linear -> SiLU -> linear (zero at
    # init) on the timestep embedding of every frame of its video. Every resnet then sees what the subject looks like
    # at every noise level and wherever it is; PISA reads the reference by attention, whose queries come from the
    # noisy frames, which at high noise match reference tokens by what they share (colour), not by shape. Zeros
    # stand for a missing reference (what the classifier-free baseline gets too). Its weights are tied to one latent
    # size. Measured on the demo (README, session 9): no better alone; with upright sprites it took the motion away
    # from the caption on 2 of 3 training seeds.
    reference_time_embedding: bool = False
    # 2-D rotary positions (base theta) in every spatial self-attention, PISA's reference tokens included: attention
    # then sees the offset between two tokens, so a frame can read the reference shifted to where its subject is.
    # None (SD / AnimateDiff): no rotary positions.
    spatial_rope_theta: float | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    motion: MotionConfig | None = None
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # False / "none", True / "full", or a policy name of jaxvc.train.compute

    def __post_init__(self):
        remat_policy(self.remat)  # an unknown policy name fails here, not at the first traced block
        levels = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"UNet config: {len(getattr(self, name))} {name} for {levels} block_out_channels")
        try:
            object.__setattr__(self, "down_block_types", tuple(DOWN_TYPES[t] for t in self.down_block_types))
            object.__setattr__(self, "up_block_types", tuple(UP_TYPES[t] for t in self.up_block_types))
        except KeyError as error:
            raise UnsupportedConfigError(f"UNet config: block type {error} is not one of "
                                         f"{sorted(DOWN_TYPES) + sorted(UP_TYPES)}") from None
        for name in ("block_out_channels", "layers_per_block", "attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))
        if self.motion is not None and not isinstance(self.motion.heads, int):
            object.__setattr__(self, "motion", dataclasses.replace(self.motion, heads=tuple(self.motion.heads)))
        if self.addition_embed_type not in (None, "text"):
            raise UnsupportedConfigError(f"UNet config: addition_embed_type={self.addition_embed_type!r} is not "
                                         "None or 'text'")
        if self.resnet_time_scale_shift not in TIME_EMBEDDING_NORMS:
            raise UnsupportedConfigError(f"UNet config: resnet_time_scale_shift={self.resnet_time_scale_shift!r} is "
                                         f"not one of {TIME_EMBEDDING_NORMS}")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"UNet config: {channels} channels not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")

    # expanded per-level views -------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    def per_level(self, name: str) -> tuple:
        return _per_block(getattr(self, name), self.levels, name)

    def motion_heads(self) -> tuple[int, ...]:
        return _per_block(self.motion.heads, self.levels, "motion.heads")

    @classmethod
    def from_diffusers(cls, unet_config: Mapping[str, Any], motion_adapter_config: Mapping[str, Any] | None = None,
                       **overrides) -> "UNetConfig":
        """Translate a diffusers ``UNet2DConditionModel`` or ``UNetMotionModel`` config.json (+ an optional
        ``MotionAdapter`` config.json); raises ``UnsupportedConfigError`` for options jaxvc does not implement."""
        from jaxvc.convert.unet import translate_diffusers_config  # the converter owns the diffusers knowledge
        return translate_diffusers_config(unet_config, motion_adapter_config, **overrides)


# Named sizes. "tiny" = PARITY.md §1a (CPU tests and the demo); "tiny_sd" = the SD1.5 topology at tiny width
# (§1b; same parameter names as the real checkpoints); "sd15" = Stable Diffusion 1.5.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_heads=4, cross_attention_dim=32,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), motion_heads=4),
    "tiny_sd": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, attention_heads=2,
                    cross_attention_dim=32, norm_num_groups=8, motion_heads=2),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_heads=8,
                 cross_attention_dim=768, norm_num_groups=32, motion_heads=8),
}
# AnimateDiff adapter layouts: v1 = mm_sd_v14/v15, v2 = mm_sd_v15_v2, v3 = v3_sd15_mm (the "v1-5-3" adapter).
MOTION_LAYOUTS: dict[str, dict[str, Any]] = {
    "v1": dict(use_mid_block=False, max_seq_length=24),
    "v2": dict(use_mid_block=True, max_seq_length=32),
    "v3": dict(use_mid_block=False, max_seq_length=32),
}


def unet_config(variant: str = "sd15", motion: str | None = "v2", **overrides) -> UNetConfig:
    """``UNetConfig`` for a named size and adapter layout (``motion=None``: plain 2-D UNet).

    ``overrides`` set UNetConfig fields (``dtype=jnp.bfloat16``, ``remat=True``, ...) or, prefixed ``motion_``,
    MotionConfig fields (``motion_norm_over_frames=False``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown UNet variant '{variant}'; known: {sorted(VARIANTS)}")
    if motion is not None and motion not in MOTION_LAYOUTS:
        raise ValueError(f"unknown motion layout '{motion}'; known: {sorted(MOTION_LAYOUTS)}")
    fields = dict(VARIANTS[variant])
    motion_heads = fields.pop("motion_heads")
    motion_fields = {k[len("motion_"):]: overrides.pop(k) for k in list(overrides) if k.startswith("motion_")}
    motion_config = None
    if motion is not None:
        motion_config = MotionConfig(**{"heads": motion_heads, **MOTION_LAYOUTS[motion], **motion_fields})
    elif motion_fields:
        raise ValueError(f"motion overrides {sorted(motion_fields)} given without a motion layout")
    return UNetConfig(**{**fields, **overrides}, motion=motion_config)


def is_motion_param(path) -> bool:
    """True for a parameter path inside a motion module (what AnimateDiff-style training updates).

    ``path`` is a tuple of keys (``("down_blocks_0", "motion_modules_1", ...)``) or a "/"-joined string."""
    parts = path.split("/") if isinstance(path, str) else [str(getattr(p, "key", p)) for p in path]
    return any(part.startswith("motion_modules") for part in parts)


# ------------------------------------------------------------------------------------------------------------
class _Level(nn.Module):
    """Shared wiring of one UNet level: resnet [-> spatial transformer] [-> motion module], ``num_layers`` times."""
    config: UNetConfig
    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    motion_heads: int | None
    num_frames: int
    reference_injection: bool = False       # last frame of each video is VideoMaker's reference (PISA)
    reference_cross_attention: bool = True

    def _reference_kw(self):
        return dict(num_frames=self.num_frames, reference_injection=self.reference_injection,
                    reference_cross_attention=self.reference_cross_attention)

    def _kw(self):
        return dict(dtype=self.config.dtype, param_dtype=self.config.param_dtype)

    def layer(self, index, h, temb, context):
        cfg = self.config
        resnet_class = remat(ResnetBlock2D, cfg.remat)
        h = resnet_class(self.out_channels, cfg.norm_num_groups, cfg.norm_eps,
                         time_embedding_norm=cfg.resnet_time_scale_shift, name=f"resnets_{index}",
                         **self._kw())(h, temb)
        if self.has_attention:
            h = Transformer2DModel(self.heads, self.out_channels // self.heads, self.transformer_layers,
                                   cfg.norm_num_groups, cfg.use_linear_projection, cfg.attention_backend, cfg.remat,
                                   name=f"attentions_{index}", rope_theta=cfg.spatial_rope_theta,
                                   **self._reference_kw(), **self._kw())(h, context)
        if self.motion_heads is not None:
            h = apply_motion_module(cfg, self.motion_heads, self.num_frames, f"motion_modules_{index}", h, context)
        return h


def apply_motion_module(cfg: UNetConfig, heads: int, num_frames: int, name: str, h, context,
                        layers: int | None = None):
    """(B*F, H, W, C) -> motion module on (B, F, H, W, C) -> (B*F, H, W, C). ``context`` (B, L, D) is used only
    with ``MotionConfig.text_cross_attention``."""
    motion = cfg.motion
    n, height, width, channels = h.shape
    video = h.reshape(n // num_frames, num_frames, height, width, channels)  # (B, F, H, W, C)
    video = MotionModule(heads, motion.layers_per_block if layers is None else layers,
                         motion.norm_num_groups or cfg.norm_num_groups, motion.max_seq_length,
                         motion.norm_over_frames, cfg.attention_backend, cfg.remat, name=name, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype)(video, context if motion.text_cross_attention else None)
    return constrain(video.reshape(n, height, width, channels), IMAGE_AXES)


class DownBlock(_Level):
    """``DownBlock2D`` / ``CrossAttnDownBlock2D`` (+ motion); returns (h, skips)."""
    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context):
        skips = []
        for index in range(self.num_layers):
            h = self.layer(index, h, temb, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, self.config.downsample_padding, name="downsamplers_0",
                             **self._kw())(h)
            skips.append(h)
        return h, skips


class UpBlock(_Level):
    """``UpBlock2D`` / ``CrossAttnUpBlock2D`` (+ motion): concat [h, skip] on channels before each resnet."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, context, upsample_size=None):
        for index in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - index].astype(h.dtype)], axis=-1)
            h = self.layer(index, h, temb, context)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, name="upsamplers_0", **self._kw())(h, upsample_size)
        return h


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn`` (+ motion, v2): resnet -> transformer [-> motion module] -> resnet."""
    config: UNetConfig
    num_frames: int
    reference_injection: bool = False
    reference_cross_attention: bool = True

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        channels = cfg.block_out_channels[-1]
        heads = cfg.per_level("attention_heads")[-1]
        resnet_class = remat(ResnetBlock2D, cfg.remat)
        h = resnet_class(channels, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor,
                         cfg.resnet_time_scale_shift, name="resnets_0", **kw)(h, temb)
        h = Transformer2DModel(heads, channels // heads, cfg.per_level("transformer_layers_per_block")[-1],
                               cfg.norm_num_groups, cfg.use_linear_projection, cfg.attention_backend, cfg.remat,
                               name="attentions_0", num_frames=self.num_frames, rope_theta=cfg.spatial_rope_theta,
                               reference_injection=self.reference_injection,
                               reference_cross_attention=self.reference_cross_attention, **kw)(h, context)
        if cfg.motion is not None and cfg.motion.use_mid_block:
            h = apply_motion_module(cfg, cfg.motion_heads()[-1], self.num_frames, "motion_modules_0", h, context,
                                    layers=cfg.motion.mid_layers_per_block)
        return resnet_class(channels, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor,
                            cfg.resnet_time_scale_shift, name="resnets_1", **kw)(h, temb)


class UNetMotion(nn.Module):
    """sample (B, F, H, W, C_in), timesteps scalar or (B,), encoder_hidden_states (B, L, D) -> (B, F, H, W, C_out).

    ``return_intermediates=True`` also returns a dict of (B, F, h, w, c) activations named after the modules
    ("conv_in", "down_blocks_i", "mid_block", "up_blocks_i").

    ``reference_latent`` (B, 1, H, W, C_in) turns on VideoMaker's reference injection: it is appended as frame F+1,
    every layer processes the F+1 frames (same timestep and text for the reference), every spatial self-attention
    is PISA (see ``transformer2d.py``), and the output is (B, F+1, H, W, C_out) with the reference's prediction
    last. ``reference_cross_attention=False`` keeps the reference frame out of cross-attention.

    ``encoder_only=True`` stops after the mid block and returns its output (B, F, h, w, c): the encoder copy of a
    ControlNet-style side network (MicroCinema's AppearNet), whose parameters need no decoder.
    """
    config: UNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, *, reference_latent=None,
                 reference_cross_attention: bool = True, return_intermediates: bool = False,
                 encoder_only: bool = False):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if sample.ndim != 5 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNetMotion: sample must be (B, F, H, W, {cfg.in_channels}), got {sample.shape}")
        injection = reference_latent is not None
        if injection:
            expected = (sample.shape[0], 1, *sample.shape[2:])
            if tuple(reference_latent.shape) != expected:
                raise ValueError(f"UNetMotion: reference_latent must be {expected} (one frame per video), got "
                                 f"{tuple(reference_latent.shape)}")
            sample = jnp.concatenate([sample, reference_latent.astype(sample.dtype)], axis=1)  # (B, F+1, H, W, C)
        reference = dict(reference_injection=injection, reference_cross_attention=reference_cross_attention)
        batch, frames, height, width, _ = sample.shape
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"UNetMotion: encoder_hidden_states must be (B={batch}, L, D) (not repeated per frame), "
                             f"got {encoder_hidden_states.shape}")
        intermediates = {}

        def record(name, h):
            if return_intermediates:
                intermediates[name] = h.reshape(batch, frames, *h.shape[1:])

        # time: (B,) -> (B, 4*C0) -> repeated per frame (B*F, 4*C0)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], name="time_embedding", **kw)(t_emb.astype(cfg.dtype))
        if cfg.addition_embed_type == "text":  # + the pooled caption: every resnet sees the text
            temb = temb + TextTimeEmbedding(4 * cfg.block_out_channels[0], cfg.addition_embed_type_num_heads,
                                            name="add_embedding", **kw)(encoder_hidden_states.astype(cfg.dtype))
        if cfg.reference_time_embedding:  # + Embed(reference pixels/latent, flattened): (B, 4*C0)
            flat = (reference_latent.reshape(batch, -1) if injection
                    else jnp.zeros((batch, height * width * cfg.in_channels)))
            temb = temb + TimestepEmbedding(4 * cfg.block_out_channels[0], zero_output=True,
                                            name="reference_embedding", **kw)(flat.astype(cfg.dtype))
        temb = jnp.repeat(temb, frames, axis=0)
        if cfg.motion is not None and cfg.motion.frame_time_embedding:  # + an embedding of the frame index
            frame_index = timestep_embedding(jnp.arange(frames, dtype=jnp.float32), cfg.block_out_channels[0],
                                             cfg.flip_sin_to_cos, cfg.freq_shift)
            frame_emb = TimestepEmbedding(4 * cfg.block_out_channels[0], name="frame_embedding",
                                          **kw)(frame_index.astype(cfg.dtype))  # (F, 4*C0)
            temb = temb + jnp.tile(frame_emb, (batch, 1))  # (b f) order, as temb
        context = encoder_hidden_states.astype(cfg.dtype)

        sample = constrain(sample, VIDEO_AXES)
        h = sample.reshape(batch * frames, height, width, cfg.in_channels)  # (B*F, H, W, C_in)
        h = constrain(Conv(cfg.block_out_channels[0], (3, 3), padding=1, name="conv_in", **kw)(h), IMAGE_AXES)
        if cfg.spatial_position_embedding:  # + Dense(sincos(row, col)): (H, W, C0), the same for every frame
            table = jnp.asarray(sinusoidal_positions_2d(height, width, cfg.block_out_channels[0]), cfg.dtype)
            position = Dense(cfg.block_out_channels[0], axes=("norm", "embed"), kernel_init=zeros,
                             name="position_embedding", **kw)(table)  # (H, W, C0)
            position = position[None]  # (1, H, W, C0): every frame
            if injection and cfg.position_free_reference:  # not on the reference (last frame of each video)
                generated = jnp.tile(jnp.arange(frames) < frames - 1, batch)  # (B*(F+1),) in (b f) order
                position = position * generated[:, None, None, None]
            h = h + position
        record("conv_in", h)

        heads = cfg.per_level("attention_heads")
        layers = cfg.per_level("layers_per_block")
        transformer_layers = cfg.per_level("transformer_layers_per_block")
        motion_heads = cfg.motion_heads() if cfg.motion is not None else (None,) * cfg.levels
        skips = [h]
        for i, block_type in enumerate(cfg.down_block_types):
            h, block_skips = DownBlock(cfg, cfg.block_out_channels[i], layers[i], block_type.startswith("CrossAttn"),
                                       heads[i], transformer_layers[i], motion_heads[i], frames,
                                       add_downsample=i < cfg.levels - 1, name=f"down_blocks_{i}",
                                       **reference)(h, temb, context)
            h = constrain(h, IMAGE_AXES)
            skips += block_skips
            record(f"down_blocks_{i}", h)

        h = constrain(MidBlock(cfg, frames, name="mid_block", **reference)(h, temb, context), IMAGE_AXES)
        record("mid_block", h)
        if encoder_only:
            out = h.reshape(batch, frames, *h.shape[1:])
            return (out, intermediates) if return_intermediates else out

        for i, block_type in enumerate(cfg.up_block_types):
            level = cfg.levels - 1 - i
            num_layers = layers[level] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            is_final = i == cfg.levels - 1
            # upsample to the next skip's size (differs from 2x when H or W is not divisible by 2**levels)
            upsample_size = None if is_final else skips[-1].shape[1:3]
            h = UpBlock(cfg, cfg.block_out_channels[level], num_layers, block_type.startswith("CrossAttn"),
                        heads[level], transformer_layers[level], motion_heads[level], frames,
                        add_upsample=not is_final, name=f"up_blocks_{i}", **reference)(h, block_skips, temb, context,
                                                                           upsample_size)
            h = constrain(h, IMAGE_AXES)
            record(f"up_blocks_{i}", h)

        h = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
        h = Conv(cfg.out_channels, (3, 3), padding=1, name="conv_out", **kw)(nn.silu(h))
        out = constrain(h.reshape(batch, frames, height, width, cfg.out_channels), VIDEO_AXES)
        return (out, intermediates) if return_intermediates else out
