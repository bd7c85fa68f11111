"""Multi-head attention used by every model in jaxvc, with the backend as one switch.

Backends (``backend=``):
  "xla"     explicit einsum + float32 softmax; runs everywhere and is the parity reference.
  "jax"     ``jax.nn.dot_product_attention`` with XLA's choice of implementation.
  "cudnn"   ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention on NVIDIA GPUs
            (needs float16/bfloat16 inputs). What cuDNN cannot or need not take goes through the einsum path
            (``_cudnn_takes``): fewer than ``CUDNN_MIN_KEYS`` keys (the motion modules' frames), odd lengths
            (cross-attention to CLIP's 77 tokens), and head dims over cuDNN's limit (SD1.5's 160 before Hopper).
  "splash"  flash attention on TPUs: Pallas's splash-attention kernel (``jaxvc/models/tpu_attention.py``), in a
            shard_map under a mesh; query and key lengths that are not multiples of 128 go through the einsum path.
            Off a TPU it runs in Pallas's interpret mode (slow; for tests).
  "ring"    context parallelism: ring attention over the mesh's ``sequence`` axis
            (``jaxvc/models/context_parallel.py``), each device keeping its key/value block and passing it on; for
            sequences too long to gather whole on one device. Without a ``sequence`` axis, or with lengths it does
            not divide, the einsum path.

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

from jaxvc.models.context_parallel import ring_attention, ring_takes
from jaxvc.models.layers import Dense
from jaxvc.models.tpu_attention import splash_attention, splash_takes

BACKENDS = ("xla", "jax", "cudnn", "splash", "ring")
# Below one flash-attention tile of keys the einsum path is as good and fuses with its neighbours; the AnimateDiff
# motion modules attend over the frames only (16-32 keys) with a batch of B*h*w positions, which flash kernels gain
# nothing on. "cudnn" therefore sends such short sequences through the einsum path.
CUDNN_MIN_KEYS = 64


def _cudnn_takes(query_length: int, key_length: int, head_dim: int) -> bool:
    """Whether "cudnn" runs this attention on cuDNN.

    * Odd lengths go to the einsum path: jax 0.11's cuDNN rule, once differentiated, refuses odd query/key lengths
      even without a bias (its empty bias placeholder counts as a bias), which failed the SD1.5 train step's
      cross-attention to CLIP's 77 tokens on an H200 ("Unsupported sequence length Q 17408, KV 77"); the einsum
      over 77 keys is cheap (its logits are 77/L of a self-attention's).
    * Head dims over jax's cuDNN limit too (a multiple of 8, at most 256 from Hopper on, 128 before): SD1.5's
      deepest level has 8 heads of 160 channels, which jax refuses on an A100 ("The head dim must be <= 128");
      that level has the fewest tokens (1/16 of the first level's, so 1/256 of its attention scores).
    """
    return (key_length >= CUDNN_MIN_KEYS and query_length % 2 == 0 and key_length % 2 == 0
            and head_dim % 8 == 0 and head_dim <= cudnn_max_head_dim())


def cudnn_max_head_dim() -> int:
    """The largest head dim jax lets cuDNN flash attention take on this GPU: 256 from Hopper (compute capability
    9.0) on, 128 before. Asked of jax's own rule, so that lowering for an assumed GPU (jaxvc/bench/cross_lower.py)
    sees the same answer; 128 (the limit everywhere) if that rule is not where this jax keeps it."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_compute_capability

        return 256 if check_compute_capability("9.0") else 128
    except Exception:  # a jax that moved the rule, or no GPU backend at all
        return 128


def dot_product_attention(query, key, value, *, backend: str = "xla", causal: bool = False, scale: float | None = None,
                          key_mask=None):
    """Scaled dot-product attention. query (B, Lq, H, D), key/value (B, Lk, H, D) -> (B, Lq, H, D).

    ``key_mask`` (B, Lk) bool: keys a query may attend to (False = ignored, as if absent); every query must keep one.
    Masked attention runs on the einsum path or jax's (cuDNN takes a mask as a bias), not on splash."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend '{backend}' is not one of {BACKENDS}")
    head_dim = query.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    if backend == "xla":
        # The scale goes on the queries (B, Lq, H, D), not on the logits (B, H, Lq, Lk): Lk/D times fewer multiplies,
        # and XLA:CPU ran the logits' multiply as a separate pass over them (8 ms of the tiny benchmark's 119 ms
        # train step per PISA layer at 512 tokens).
        query = (query.astype(jnp.float32) * scale).astype(query.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        if causal:
            lq, lk = query.shape[1], key.shape[1]
            allowed = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
            logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        # softmax with the normalization after the value product: one divide per output (B, Lq, H, D) instead of
        # one per weight (B, H, Lq, Lk)
        unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
        out = jnp.einsum("bhqk,bkhd->bqhd", unnormalized.astype(value.dtype), value,
                         preferred_element_type=jnp.float32)
        total = jnp.transpose(unnormalized.sum(axis=-1), (0, 2, 1))[..., None]  # (B, Lq, H, 1)
        return (out / total).astype(value.dtype)
    lq, lk = query.shape[1], key.shape[1]
    if backend == "ring" and ring_takes(lq, lk):
        return ring_attention(query, key, value, scale=scale, causal=causal, key_mask=key_mask)
    # Shapes a flash kernel refuses (its length or head-size rules) go through the einsum path instead, and so does
    # the ring backend without a sequence axis that divides both lengths.
    if ((backend == "splash" and (key_mask is not None or not splash_takes(lq, lk, causal)))
            or (backend == "cudnn" and not _cudnn_takes(lq, lk, head_dim)) or backend == "ring"):
        return dot_product_attention(query, key, value, backend="xla", causal=causal, scale=scale, key_mask=key_mask)
    if key_mask is not None:
        mask = key_mask[:, None, None, :]
        if causal:
            mask = mask & jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)[None, None]
        implementation = "cudnn" if backend == "cudnn" else None
        return jax.nn.dot_product_attention(query, key, value, scale=scale, mask=mask, implementation=implementation)
    if backend == "splash":
        return splash_attention(query, key, value, scale=scale, causal=causal)
    implementation = "cudnn" if backend == "cudnn" else None
    if causal and lq != lk:
        # jax.nn's is_causal aligns the mask top-left; the einsum path (and a query block at the end of a longer
        # key sequence) aligns it bottom-right: pass that mask explicitly so every backend means the same
        mask = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)[None, None]
        return jax.nn.dot_product_attention(query, key, value, scale=scale, mask=mask,
                                            implementation=implementation)
    return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=causal,
                                        implementation=implementation)


def rotary_2d(height: int, width: int, head_dim: int, theta: float):
    """(cos, sin), each (H*W, head_dim): 2-D rotary position embedding of a row-major H x W token grid. The first half
    of each head's channels rotates with the row, the second with the column; channel pair (i, i + n/2) of a half of
    n channels turns by position * theta^(-i / (n/2)) (i < n/2). q.k then depends on the tokens' offset, not on
    where they are."""
    if head_dim % 4:
        raise ValueError(f"rotary_2d: head_dim={head_dim} must be a multiple of 4 (two halves of rotated pairs)")
    pairs = head_dim // 4
    frequencies = theta ** (-jnp.arange(pairs, dtype=jnp.float32) / pairs)  # (pairs,)
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                              indexing="ij")
    angle_rows = rows.reshape(-1, 1) * frequencies  # (H*W, pairs)
    angle_cols = cols.reshape(-1, 1) * frequencies
    angles = jnp.concatenate([angle_rows, angle_rows, angle_cols, angle_cols], axis=-1)  # (H*W, head_dim)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
    """x (B, L, H, D) rotated per token by (cos, sin) (L, D): each half of D is [a; b] -> [a c - b s; b c + a s]."""
    def rotate_half(t):  # within each of the two halves (row part, column part): [a; b] -> [-b; a]
        quarter = t.shape[-1] // 4
        a, b, c, d = (t[..., i * quarter:(i + 1) * quarter] for i in range(4))
        return jnp.concatenate([-b, a, -d, c], axis=-1)
    cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention with diffusers-style projections.

    hidden (B, L, C); ``context`` (B, Lc, Cc) makes it cross-attention; ``reference_tokens`` (B, Lr, C) makes it
    reference-injected self-attention and the call returns ``(hidden_out (B, L, C), reference_out (B, Lr, C))``.
    ``projection_names`` lets models keep their checkpoint's names (CLIP: q_proj/k_proj/v_proj/out_proj).
    ``rotary`` (cos, sin), each (L_total, head_dim) for the whole self-attention sequence (own tokens, then the
    reference's), rotates queries and keys (``rotary_2d``).
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
    def __call__(self, hidden, context=None, reference_tokens=None, rotary=None):
        if context is not None and reference_tokens is not None:
            raise ValueError("Attention: reference_tokens apply to self-attention only, not with a context")
        if context is not None and rotary is not None:
            raise ValueError("Attention: rotary positions apply to self-attention only, not with a context")
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
        query, key = split(query), split(key)
        if rotary is not None:
            if rotary[0].shape != (query.shape[1], self.head_dim):
                raise ValueError(f"Attention: rotary tables must be ({query.shape[1]}, {self.head_dim}), got "
                                 f"{rotary[0].shape}")
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        out = dot_product_attention(query, key, split(value), backend=self.backend, causal=self.causal)
        out = out.reshape(*out.shape[:2], inner)
        out = Dense(self.out_features or hidden.shape[-1], use_bias=self.out_bias, axes=("heads", "embed"),
                    name=out_name, **dense)(out)
        if reference_tokens is not None:
            return out[:, :num_own], out[:, num_own:]
        return out
