"""Timestep and positional embeddings (diffusers semantics)."""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.models.attention import dot_product_attention
from jaxvc.models.layers import Dense, LayerNorm


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``). ``zero_output``: linear_2 starts at zero, so
    an embedding added to a pretrained one changes nothing until it is trained."""
    features: int
    out_features: int | None = None
    zero_output: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.features, axes=("embed", "mlp"), name="linear_1", **kw)(x)
        x = nn.silu(x)
        out_init = dict(kernel_init=nn.initializers.zeros) if self.zero_output else {}
        return Dense(self.out_features or self.features, axes=("mlp", "embed"), name="linear_2", **out_init,
                     **kw)(x)


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """AnimateDiff's positional encoding (length, dim), sin on even and cos on odd channels (interleaved)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    pe = np.zeros((length, dim), dtype=np.float64)
    pe[:, 0::2] = np.sin(position * div)
    pe[:, 1::2] = np.cos(position * div)
    return pe.astype(np.float32)


def sinusoidal_positions_2d(height: int, width: int, dim: int) -> np.ndarray:
    """(height, width, dim) table: the first half of the channels encodes the row, the second the column, each as
    ``sinusoidal_positions`` (MAE / DiT-style 2-D sin-cos). ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"2-D positional table: {dim} channels are not divisible by 4")
    rows = sinusoidal_positions(height, dim // 2)[:, None, :].repeat(width, axis=1)  # (H, W, dim/2)
    cols = sinusoidal_positions(width, dim // 2)[None, :, :].repeat(height, axis=0)  # (H, W, dim/2)
    return np.concatenate([rows, cols], axis=-1)


class AttentionPooling(nn.Module):
    """(B, L, D) -> (B, D): one query token (the tokens' mean + a learned ``positional_embedding``) attends over
    [query, tokens] with ``heads`` heads (diffusers ``AttentionPooling``, from DeepFloyd IF)."""
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        batch, length, width = tokens.shape
        if width % self.heads:
            raise ValueError(f"{self.name}: {width} channels are not divisible by {self.heads} heads")
        head_dim = width // self.heads
        kw = dict(axes=("embed", "heads"), dtype=self.dtype, param_dtype=self.param_dtype)
        position = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(width ** -0.5), (None, "embed")), (1, width), self.param_dtype)
        class_token = tokens.mean(axis=1, keepdims=True) + position.astype(tokens.dtype)  # (B, 1, D)
        tokens = jnp.concatenate([class_token, tokens], axis=1)  # (B, 1 + L, D)
        query = Dense(width, name="q_proj", **kw)(class_token).reshape(batch, 1, self.heads, head_dim)
        key = Dense(width, name="k_proj", **kw)(tokens).reshape(batch, length + 1, self.heads, head_dim)
        value = Dense(width, name="v_proj", **kw)(tokens).reshape(batch, length + 1, self.heads, head_dim)
        return dot_product_attention(query, key, value).reshape(batch, width)  # (B, 1, heads, d) -> (B, D)


class TextTimeEmbedding(nn.Module):
    """Text tokens (B, L, D) -> (B, features): LayerNorm -> AttentionPooling -> Linear -> LayerNorm (diffusers
    ``TextTimeEmbedding``, the UNet's ``addition_embed_type="text"``). Added to the timestep embedding, it gives
    every resnet the caption, not only the cross-attention layers."""
    features: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = LayerNorm(1e-5, name="norm1", **kw)(tokens)
        hidden = AttentionPooling(self.heads, name="pool", **kw)(hidden)
        hidden = Dense(self.features, axes=("embed", "mlp"), name="proj", **kw)(hidden)
        return LayerNorm(1e-5, name="norm2", **kw)(hidden)
