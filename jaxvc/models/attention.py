"""Multi-head attention used by every model in jaxvc, with the backend as one switch.

Backends (``backend=``):
  "xla"     explicit einsum + float32 softmax; runs everywhere and is the parity reference.
  "jax"     ``jax.nn.dot_product_attention`` with XLA's choice of implementation.
  "cudnn"   ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention on NVIDIA GPUs
            (needs float16/bfloat16 inputs).

Reference-injected self-attention (VideoMaker's PISA) enters through ``reference_tokens``: the reference tokens are
appended to the sequence, every token (frame and reference) attends over ``[own tokens; reference tokens]``
bidirectionally with the same projections, and both outputs are returned. What happens to the reference output
(VideoMaker averages it over frames) is decided by the caller, which knows the frame layout.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.layers import Dense

BACKENDS = ("xla", "jax", "cudnn")


def dot_product_attention(query, key, value, *, backend: str = "xla", causal: bool = False, scale: float | None = None):
    """Scaled dot-product attention. query (B, Lq, H, D), key/value (B, Lk, H, D) -> (B, Lq, H, D)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend '{backend}' is not one of {BACKENDS}")
    head_dim = query.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    if backend == "xla":
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
        if causal:
            lq, lk = query.shape[1], key.shape[1]
            allowed = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    implementation = "cudnn" if backend == "cudnn" else None
    return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=causal,
                                        implementation=implementation)


class Attention(nn.Module):
    """Multi-head attention with diffusers-style projections.

    hidden (B, L, C); ``context`` (B, Lc, Cc) makes it cross-attention; ``reference_tokens`` (B, Lr, C) makes it
    reference-injected self-attention and the call returns ``(hidden_out (B, L, C), reference_out (B, Lr, C))``.
    ``projection_names`` lets models keep their checkpoint's names (CLIP: q_proj/k_proj/v_proj/out_proj).
    """
    heads: int
    head_dim: int
    out_features: int | None = None
    qkv_bias: bool = False
    out_bias: bool = True
    backend: str = "xla"
    causal: bool = False
    projection_names: tuple[str, str, str, str] = ("to_q", "to_k", "to_v", "to_out_0")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, context=None, reference_tokens=None):
        if context is not None and reference_tokens is not None:
            raise ValueError("Attention: reference_tokens apply to self-attention only, not with a context")
        inner = self.heads * self.head_dim
        q_name, k_name, v_name, out_name = self.projection_names
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        num_own = hidden.shape[1]
        if reference_tokens is not None:
            hidden = jnp.concatenate([hidden, reference_tokens.astype(hidden.dtype)], axis=1)  # (B, L+Lr, C)
        source = hidden if context is None else context
        query = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name=q_name, **dense)(hidden)
        key = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name=k_name, **dense)(source)
        value = Dense(inner, use_bias=self.qkv_bias, axes=("embed", "heads"), name=v_name, **dense)(source)
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)  # (B, L, H, D)
        out = dot_product_attention(split(query), split(key), split(value), backend=self.backend, causal=self.causal)
        out = out.reshape(*out.shape[:2], inner)
        out = Dense(self.out_features or hidden.shape[-1], use_bias=self.out_bias, axes=("heads", "embed"),
                    name=out_name, **dense)(out)
        if reference_tokens is not None:
            return out[:, :num_own], out[:, num_own:]
        return out
