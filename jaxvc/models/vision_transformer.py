"""Image towers of the evaluation metrics: CLIP's vision transformer and DINO's ViT, in Flax linen.

Both are the same pre-LN transformer over ``[CLS] + patches`` and reuse the CLIP text tower's layer stack
(``clip_text.CLIPEncoder``, not causal here). They differ in four switches, read from the transformers config:

| | CLIP (``CLIPVisionModel`` + ``visual_projection``) | DINO (``ViTModel``, e.g. ``facebook/dino-vits16``) |
|---|---|---|
| patch conv bias | no | yes |
| LayerNorm before the encoder | ``pre_layrnorm`` (sic, transformers' name) | none |
| activation, LayerNorm eps | quick_gelu, 1e-5 | gelu, 1e-12 |
| image embedding | ``visual_projection(post_layernorm(CLS))`` | ``layernorm(CLS)`` |

Module names follow transformers' CLIP keys, so ``jaxvc/convert/vision.py`` loads a CLIP folder as it is and a
ViT folder after renaming its keys. The position table has exactly ``(image_size / patch_size)^2 + 1`` rows: inputs
must be ``image_size`` square (``jaxvc/eval/preprocess.py`` makes them so), positions are not interpolated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.clip_text import CLIPEncoder, check_transformer_config
from jaxvc.models.layers import Conv, Dense, Embed, LayerNorm

FAMILIES = ("clip", "vit")


@dataclass(frozen=True)
class VisionConfig:
    """Architecture of an image tower (defaults: CLIP ViT-B/32, the CLIP-T/CLIP-I backbone)."""
    family: str = "clip"
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512  # CLIP's visual_projection (no bias); None: the normed CLS is the embedding
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"VisionConfig: family '{self.family}' is not one of {FAMILIES}")
        check_transformer_config(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], source: str = "config.json",
                          **overrides) -> "VisionConfig":
        """From a transformers ``config.json`` dict: a ``CLIPModel`` (its ``vision_config`` and
        ``projection_dim``), a ``CLIPVisionModel``, or a ``ViTModel`` (``model_type`` ``"vit"``, DINO)."""
        model_type = config.get("model_type", "")
        if model_type == "vit":
            family, vision, projection = "vit", config, None
            defaults = dict(hidden_act="gelu", layer_norm_eps=1e-12, patch_size=16)
        elif model_type in ("clip", "clip_vision_model"):
            vision = (config.get("vision_config") or config) if model_type == "clip" else config
            family, projection = "clip", config.get("projection_dim", 512)
            defaults = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=32)
        else:
            raise ValueError(f"{source}: model_type '{model_type}' is not an image tower jaxvc reads "
                             "(expected 'clip', 'clip_vision_model' or 'vit')")
        kwargs = dict(
            family=family, image_size=int(vision.get("image_size", 224)),
            patch_size=int(vision.get("patch_size", defaults["patch_size"])),
            num_channels=int(vision.get("num_channels", 3)), hidden_size=int(vision.get("hidden_size", 768)),
            intermediate_size=int(vision.get("intermediate_size", 3072)),
            num_layers=int(vision.get("num_hidden_layers", 12)), num_heads=int(vision.get("num_attention_heads", 12)),
            hidden_act=str(vision.get("hidden_act", defaults["hidden_act"])),
            layer_norm_eps=float(vision.get("layer_norm_eps", defaults["layer_norm_eps"])),
            projection_dim=None if projection is None else int(projection))
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def variant(cls, name: str, **overrides) -> "VisionConfig":
        """Named sizes: ``"clip-vit-b32"``, ``"dino-vits16"`` (the metrics' backbones) and ``"tiny"`` (tests)."""
        if name not in VISION_VARIANTS:
            raise ValueError(f"unknown vision variant '{name}'; expected one of {sorted(VISION_VARIANTS)}")
        return dataclasses.replace(VISION_VARIANTS[name], **overrides)


VISION_VARIANTS = {
    "clip-vit-b32": VisionConfig(),
    "dino-vits16": VisionConfig(family="vit", patch_size=16, hidden_size=384, intermediate_size=1536, num_heads=6,
                                hidden_act="gelu", layer_norm_eps=1e-12, projection_dim=None),
    "tiny": VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, projection_dim=16),
}


class VisionEmbeddings(nn.Module):
    """pixels (B, S, S, C) -> tokens (B, 1 + (S/p)^2, D): the class embedding, then the patches, plus positions."""
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        patches = Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding=0,
                       use_bias=cfg.family == "vit", name="patch_embedding", **kw)(pixels)  # (B, S/p, S/p, D)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)  # row-major, as torch's flatten(2)
        class_embedding = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (cfg.hidden_size,), cfg.param_dtype)
        cls = jnp.broadcast_to(class_embedding.astype(cfg.dtype), (patches.shape[0], 1, cfg.hidden_size))
        positions = Embed(cfg.num_positions, cfg.hidden_size, axes=(None, "embed"), name="position_embedding",
                          **kw)(jnp.arange(cfg.num_positions))  # (1 + N, D)
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class VisionTransformer(nn.Module):
    """pixels (B, S, S, C), normalised as the family's processor does -> dict(
    ``pooler_output`` (B, D): the final-normed CLS token; ``image_embeds`` (B, P or D): the metrics' embedding,
    not yet L2-normalised; ``hidden_states`` on request: ``(embeddings, after layer 1, ..., after layer N)``)."""
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels, *, output_hidden_states: bool = False):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"VisionTransformer: pixels must be (batch, {', '.join(map(str, expected))}), got "
                             f"shape {tuple(pixels.shape)}")
        x = VisionEmbeddings(cfg, name="embeddings")(pixels)
        if cfg.family == "clip":
            x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        states = CLIPEncoder(cfg, causal=False, name="encoder")(x)
        # CLIP norms only the CLS token (post_layernorm), ViT every token (layernorm); per token they agree.
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(states[-1][:, 0])  # (B, D)
        embeds = pooled
        if cfg.projection_dim is not None:
            embeds = Dense(cfg.projection_dim, use_bias=False, axes=("embed", None), name="visual_projection",
                           **kw)(pooled)  # (B, P)
        out = {"pooler_output": pooled, "image_embeds": embeds}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out


def abstract_vision_params(config: VisionConfig):
    """The boxed ShapeDtypeStruct tree of ``{"params": ...}`` without running an initialiser."""
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return jax.eval_shape(VisionTransformer(config).init, jax.random.key(0), pixels)
