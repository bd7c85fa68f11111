"""CLIP text encoder (transformers ``CLIPTextModel``, no projection) in Flax linen.

Pre-LN transformer with a causal mask, quick_gelu MLP and LayerNorm eps 1e-5. Module names mirror the transformers
keys (``embeddings/token_embedding``, ``encoder/layers_3/self_attn/q_proj``, ``final_layer_norm``) so that
``jaxvc/convert/clip.py`` maps a ``text_encoder/`` folder mechanically.

Outputs follow transformers: ``last_hidden_state`` is after ``final_layer_norm``; ``hidden_states`` (on request) is
``(embeddings, after layer 1, ..., after layer N)``, so ``hidden_states[-1]`` is *before* the final norm (clip-skip k
in diffusers is ``final_layer_norm(hidden_states[-(k + 1)])``, see ``CLIPTextEncoder.clip_skip``); ``pooler_output``
is the final-normed state at the first ``eos_token_id``, or at ``argmax(input_ids)`` when ``eos_token_id == 2`` (the
legacy value in SD 1.5's config, kept by transformers for compatibility).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.attention import Attention
from jaxvc.models.layers import Dense, Embed, LayerNorm, constrain, gelu_exact, quick_gelu

ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}
LEGACY_EOS_TOKEN_ID = 2
TOKEN_AXES = ("batch", "tokens", "channels")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (defaults: SD 1.5's ViT-L/14 text encoder)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        check_transformer_config(self)

    @classmethod
    def variant(cls, name: str, **overrides) -> "CLIPTextConfig":
        """Named sizes: ``"tiny"`` (CPU tests and the demo) and ``"sd15"`` (SD 1.5's text encoder)."""
        if name not in CLIP_TEXT_VARIANTS:
            raise ValueError(f"unknown CLIP text variant '{name}'; expected one of {sorted(CLIP_TEXT_VARIANTS)}")
        return dataclasses.replace(CLIP_TEXT_VARIANTS[name], **overrides)

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], **overrides) -> "CLIPTextConfig":
        """From a transformers ``config.json`` dict: a ``CLIPTextModel`` config, or a full ``CLIPModel`` one
        (its ``text_config`` is used)."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"] or {}
        eos = config.get("eos_token_id", 49407)
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"CLIP text config: eos_token_id {eos} names several tokens; expected one")
            eos = eos[0]
        kwargs = dict(
            vocab_size=int(config.get("vocab_size", 49408)), hidden_size=int(config.get("hidden_size", 512)),
            intermediate_size=int(config.get("intermediate_size", 2048)),
            num_layers=int(config.get("num_hidden_layers", 12)), num_heads=int(config.get("num_attention_heads", 8)),
            max_position_embeddings=int(config.get("max_position_embeddings", 77)),
            hidden_act=str(config.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)), eos_token_id=int(eos))
        kwargs.update(overrides)
        return cls(**kwargs)


def check_transformer_config(config) -> None:
    """The checks every config of a ``CLIPEncoder`` stack needs (the text tower's and the image towers')."""
    name = type(config).__name__
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{name}: hidden_act '{config.hidden_act}' is not one of {sorted(ACTIVATIONS)}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"{name}: hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")


CLIP_TEXT_VARIANTS = {
    "tiny": CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
    # SD 1.5's text_encoder/config.json still carries the legacy eos_token_id 2 (pooling at argmax(ids)).
    "sd15": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                           eos_token_id=LEGACY_EOS_TOKEN_ID),
}


class CLIPMLP(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = Dense(cfg.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        return Dense(cfg.hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """x + attn(layer_norm1(x)), then + mlp(layer_norm2(.)): pre-LN self-attention, causal for text.

    ``config`` needs only the transformer's fields (hidden_size, intermediate_size, num_heads, hidden_act,
    layer_norm_eps, attention_backend, dtypes), so the image towers (``vision_transformer.py``) reuse it.
    """
    config: CLIPTextConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        h = Attention(cfg.num_heads, cfg.hidden_size // cfg.num_heads, qkv_bias=True, out_bias=True,
                      backend=cfg.attention_backend, causal=self.causal,
                      projection_names=("q_proj", "k_proj", "v_proj", "out_proj"), name="self_attn", **kw)(h)
        x = x + h
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        x = x + CLIPMLP(cfg, name="mlp")(h)
        return constrain(x, TOKEN_AXES)


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        tokens = Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)  # (B, L, D)
        positions = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"),
                          name="position_embedding", **kw)(jnp.arange(input_ids.shape[1]))  # (L, D)
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    """The layer stack; returns ``[input, after layer 1, ..., after layer N]``."""
    config: CLIPTextConfig
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        states = [x]
        for i in range(self.config.num_layers):
            x = CLIPEncoderLayer(self.config, self.causal, name=f"layers_{i}")(x)
            states.append(x)
        return states


class CLIPTextEncoder(nn.Module):
    """input_ids (B, L<=77) int32 -> dict(last_hidden_state (B, L, D), pooler_output (B, D)[, hidden_states])."""
    config: CLIPTextConfig

    def setup(self):
        cfg = self.config
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, *, output_hidden_states: bool = False):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextEncoder: input_ids must be (batch, length), got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextEncoder: sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        input_ids = input_ids.astype(jnp.int32)
        states = self.encoder(self.embeddings(input_ids))
        last_hidden_state = self.final_layer_norm(states[-1])
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            pool_index = jnp.argmax(input_ids, axis=-1)  # highest id = <|endoftext|> in the CLIP vocabulary
        else:
            pool_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first eos (pad may equal eos)
        pooled = jnp.take_along_axis(last_hidden_state, pool_index[:, None, None], axis=1)[:, 0]  # (B, D)
        out = {"last_hidden_state": last_hidden_state, "pooler_output": pooled}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out

    def clip_skip(self, input_ids, skip: int):
        """diffusers' ``clip_skip``: final_layer_norm of the output ``skip`` layers before the last (0 = usual)."""
        if not 0 <= skip <= self.config.num_layers:
            raise ValueError(f"clip_skip must be in [0, {self.config.num_layers}], got {skip}")
        states = self.encoder(self.embeddings(input_ids.astype(jnp.int32)))
        return self.final_layer_norm(states[-(skip + 1)])


def abstract_clip_text_params(config: CLIPTextConfig):
    """The boxed ShapeDtypeStruct tree of ``{"params": ...}`` without running an initialiser."""
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(CLIPTextEncoder(config).init, jax.random.key(0), ids)
