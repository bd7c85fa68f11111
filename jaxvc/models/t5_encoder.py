"""The T5 / UMT5 text encoder (transformers ``T5EncoderModel`` / ``UMT5EncoderModel``) in Flax linen.

Wan 2.x reads its prompts with UMT5-XXL's encoder (CogVideoX, the disentangled S2V paper's base, with T5-XXL's).
Per block: ``x += o(attention(layer_norm(x)))`` with T5's unscaled dot products plus a learned relative-position bias
(bucketed offsets, bidirectional), then ``x += wo(act(wi_0(layer_norm(x))) * wi_1(layer_norm(x)))`` (gated, T5 v1.1 /
UMT5) or ``wo(act(wi(...)))``; RMS layer norms without mean or bias (eps 1e-6), a final one. T5 learns one bias table
in the first block and shares it; UMT5 learns one per block. Padding tokens are masked as keys.

Sharding: the embeddings and every block's output (B, L, d_model) are constrained to CLIP text's ``TOKEN_AXES``
(batch over the data axes, tokens over sequence, per the rule table); a no-op outside ``jaxvc.parallel.mesh.activate``.

Parameter paths mirror transformers' keys (``encoder/block_3/layer_1/DenseReluDense/wi_0/kernel`` <->
``encoder.block.3.layer.1.DenseReluDense.wi_0.weight``), so ``jaxvc/convert/t5.py`` loads a folder mechanically.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.models.clip_text import TOKEN_AXES
from jaxvc.models.layers import Dense, Embed, RMSNorm, constrain, gelu_exact

ACTIVATIONS = {"gelu_new": lambda x: jax.nn.gelu(x, approximate=True), "gelu_pytorch_tanh":
               lambda x: jax.nn.gelu(x, approximate=True), "gelu": gelu_exact, "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """transformers' ``T5Config`` / ``UMT5Config`` fields the encoder uses (same names)."""
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    bias_per_layer: bool = True  # UMT5; T5 shares the first block's table
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 encoder: dense_act_fn {self.dense_act_fn!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any], *, source: str = "config.json",
                          **overrides) -> "T5EncoderConfig":
        """From a transformers ``T5Config`` / ``UMT5Config`` dict (``feed_forward_proj`` "gated-gelu" etc.)."""
        model_type = config.get("model_type", "t5")
        if model_type not in ("t5", "umt5"):
            raise ValueError(f"{source}: model_type {model_type!r} is not 't5' or 'umt5'")
        projection = config.get("feed_forward_proj", "relu")
        gated = projection.startswith("gated-")
        act = projection.split("-", 1)[1] if gated else projection
        if act == "gelu" and gated:
            act = "gelu_new"  # transformers: "gated-gelu" means the tanh approximation
        fields = {k: config[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                         "relative_attention_num_buckets", "relative_attention_max_distance",
                                         "layer_norm_epsilon") if k in config}
        return cls(**{**fields, "dense_act_fn": act, "is_gated_act": gated, "bias_per_layer": model_type == "umt5",
                      **overrides})


T5_VARIANTS = {
    "tiny": dict(vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
    "umt5_xxl": dict(),  # Wan 2.x's text encoder
    "t5_v1_1_xxl": dict(vocab_size=32128, num_heads=64, bias_per_layer=False),
}


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(Lq, Lk) bucket of each key's offset from each query, bidirectional: transformers' formula, in float32 as
    torch computes it (a float64 log would move offsets that land on a bucket edge, such as 16, by one bucket)."""
    offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (offset > 0).astype(np.int64) * half
    distance = np.abs(offset)
    max_exact = half // 2
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    config: T5EncoderConfig
    has_relative_bias: bool

    @nn.compact
    def __call__(self, hidden, key_mask, position_bias=None):
        cfg = self.config
        kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        inner = cfg.num_heads * cfg.d_kv
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)  # (B, L, H, Dk)
        query, key, value = (split(Dense(inner, axes=("embed", "heads"), name=n, **kw)(hidden)) for n in "qkv")
        if self.has_relative_bias:
            length = hidden.shape[1]
            buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            table = Embed(cfg.relative_attention_num_buckets, cfg.num_heads, axes=(None, "heads"),
                          name="relative_attention_bias", param_dtype=cfg.param_dtype)
            position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1)).astype(jnp.float32)  # (H, L, L)
        out = _biased_attention(query, key, value, position_bias, key_mask)
        return Dense(cfg.d_model, axes=("heads", "embed"), name="o", **kw)(out.reshape(*out.shape[:2], inner)), \
            position_bias


def _biased_attention(query, key, value, bias, key_mask):
    """softmax(q k^T + bias, masked) v without T5's (absent) 1/sqrt(d) scale; float32 logits and softmax."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) + bias[None]
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)


class _SelfAttentionLayer(nn.Module):
    config: T5EncoderConfig
    has_relative_bias: bool

    @nn.compact
    def __call__(self, hidden, key_mask, position_bias):
        cfg = self.config
        normed = RMSNorm(cfg.layer_norm_epsilon, name="layer_norm", dtype=cfg.dtype, param_dtype=cfg.param_dtype)(
            hidden)
        out, position_bias = T5Attention(cfg, self.has_relative_bias, name="SelfAttention")(normed, key_mask,
                                                                                          position_bias)
        return hidden + out, position_bias


class _DenseReluDense(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(Dense(cfg.d_ff, name="wi_0", **kw)(x)) * Dense(cfg.d_ff, name="wi_1", **kw)(x)
        else:
            h = act(Dense(cfg.d_ff, name="wi", **kw)(x))
        return Dense(cfg.d_model, axes=("mlp", "embed"), name="wo", **kw)(h)


class _FeedForwardLayer(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        normed = RMSNorm(cfg.layer_norm_epsilon, name="layer_norm", dtype=cfg.dtype, param_dtype=cfg.param_dtype)(
            hidden)
        return hidden + _DenseReluDense(cfg, name="DenseReluDense")(normed)


class _Block(nn.Module):
    config: T5EncoderConfig
    has_relative_bias: bool

    @nn.compact
    def __call__(self, hidden, key_mask, position_bias):
        hidden, position_bias = _SelfAttentionLayer(self.config, self.has_relative_bias, name="layer_0")(
            hidden, key_mask, position_bias)
        # the block's output (B, L, d_model): batch over the data axes, tokens over sequence (the rule table)
        return constrain(_FeedForwardLayer(self.config, name="layer_1")(hidden), TOKEN_AXES), position_bias


class _Stack(nn.Module):
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, hidden, key_mask):
        cfg = self.config
        position_bias = None
        for index in range(cfg.num_layers):
            has_bias = cfg.bias_per_layer or index == 0
            hidden, position_bias = _Block(cfg, has_bias, name=f"block_{index}")(hidden, key_mask, position_bias)
        return RMSNorm(cfg.layer_norm_epsilon, name="final_layer_norm", dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype)(hidden)


class T5Encoder(nn.Module):
    """input_ids (B, L), attention_mask (B, L) (1 = token, 0 = padding; default all 1) -> last hidden state
    (B, L, d_model)."""
    config: T5EncoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden = Embed(cfg.vocab_size, cfg.d_model, name="shared", dtype=cfg.dtype, param_dtype=cfg.param_dtype)(
            input_ids)  # (B, L, d_model)
        hidden = constrain(hidden, TOKEN_AXES)  # split like the ids, not like the (vocab, embed)-split table
        return _Stack(cfg, name="encoder")(hidden, jnp.asarray(attention_mask).astype(bool))


def abstract_t5_params(config: T5EncoderConfig):
    """The boxed ShapeDtypeStruct tree of ``{"params": ...}`` without running an initialiser."""
    return jax.eval_shape(T5Encoder(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
