"""AnimateDiff motion module (diffusers ``AnimateDiffTransformer3D``): self-attention across frames.

Video (B, F, H, W, C) -> GroupNorm(eps 1e-6) -> (B*H*W, F, C) -> proj_in -> temporal transformer blocks ->
proj_out -> back to (B, F, H, W, C) -> + residual. Each block: ``h += attn1(norm1(h) + pe)``,
``h += attn2(norm2(h) + pe)`` (both self-attention over frames, no text), ``h += ff(norm3(h))`` (GEGLU).

The GroupNorm statistics (``norm_over_frames``):
  True  (default): statistics over all frames of a video, as diffusers normalises the 5-D tensor. Parity with
        diffusers is tested; this is what diffusers-based AnimateDiff pipelines compute.
  False: statistics per frame, as the original guoyww/AnimateDiff ``TemporalTransformer3DModel`` (which folds
        frames into the batch before its norm). On random weights the two differ by up to ~0.9.

The positional table ``pe`` (sin on even, cos on odd channels) is a computed constant, not a parameter: its values do
not depend on ``max_seq_length``, which only caps the number of frames. If a checkpoint's stored table differs from
the formula, the loaders put it in the ``"buffers"`` collection (``.../transformer_blocks_k/pos_embed``,
(max_seq_length, C)) and the block uses it instead.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.attention import Attention
from jaxvc.models.embeddings import sinusoidal_positions
from jaxvc.models.layers import Dense, GroupNorm, LayerNorm
from jaxvc.models.transformer2d import FeedForward
from jaxvc.train.compute import remat

BUFFERS = "buffers"


class TemporalTransformerBlock(nn.Module):
    """hidden (M, F, C) with M = B*H*W -> (M, F, C)."""
    heads: int
    head_dim: int
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def positions(self, frames: int, channels: int):
        """(F, C) table: a stored one from the ``buffers`` collection when present, else the formula."""
        if self.has_variable(BUFFERS, "pos_embed"):
            table = self.get_variable(BUFFERS, "pos_embed")
            if table.shape[0] < frames or table.shape[1] != channels:
                raise ValueError(f"{self.name}: stored positional table {table.shape} cannot cover "
                                 f"{frames} frames x {channels} channels")
            return jnp.asarray(table[:frames], self.dtype)
        return jnp.asarray(sinusoidal_positions(frames, channels), self.dtype)

    @nn.compact
    def __call__(self, hidden, context=None):
        """``context`` (B, L, D) makes ``attn2`` cross-attention to the text (``MotionConfig.text_cross_attention``):
        each frame's query (features + frame position) reads the caption, so what a frame takes from the text can
        depend on where it sits in the clip."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, backend=self.attention_backend, **kw)
        pe = self.positions(hidden.shape[1], hidden.shape[2])[None]  # (1, F, C)
        hidden = hidden + Attention(name="attn1", **attn)(LayerNorm(1e-5, name="norm1", **kw)(hidden) + pe)
        query = LayerNorm(1e-5, name="norm2", **kw)(hidden) + pe
        if context is None:
            hidden = hidden + Attention(name="attn2", **attn)(query)
        else:
            # every query attends to the same text, so the B*H*W sequences of one video share one key/value set:
            # (B*H*W, F, C) -> (B, H*W*F, C) -> cross-attention to (B, L, D) -> back
            videos = context.shape[0]
            per_video = query.reshape(videos, -1, query.shape[-1])
            hidden = hidden + Attention(name="attn2", **attn)(per_video, context).reshape(hidden.shape)
        return hidden + FeedForward(name="ff", **kw)(LayerNorm(1e-5, name="norm3", **kw)(hidden))


class MotionModule(nn.Module):
    """x (B, F, H, W, C) -> (B, F, H, W, C). ``heads`` splits C (head_dim = C // heads)."""
    heads: int
    num_layers: int = 1
    norm_num_groups: int = 32
    max_seq_length: int = 32
    norm_over_frames: bool = True
    attention_backend: str = "xla"
    remat: bool | str = False  # or a remat policy name (jaxvc.train.compute)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        """``context`` (B, L, D): the text, for motion modules whose ``attn2`` reads it (None: AnimateDiff)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, frames, height, width, channels = x.shape
        if context is not None and (context.ndim != 3 or context.shape[0] != batch):
            raise ValueError(f"motion module '{self.name}': context must be (B={batch}, L, D), got {context.shape}")
        if frames > self.max_seq_length:
            raise ValueError(f"motion module '{self.name}': {frames} frames exceed max_seq_length "
                             f"{self.max_seq_length} of this motion adapter")
        if channels % self.heads:
            raise ValueError(f"motion module '{self.name}': {channels} channels are not divisible by "
                             f"{self.heads} heads")
        norm = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)
        if self.norm_over_frames:
            h = norm(x)  # statistics over (F, H, W, C/G) per video
        else:
            h = norm(x.reshape(batch * frames, height, width, channels)).reshape(x.shape)  # per frame
        h = h.transpose(0, 2, 3, 1, 4).reshape(batch * height * width, frames, channels)  # (B*H*W, F, C)
        h = Dense(channels, axes=("embed", "heads"), name="proj_in", **kw)(h)
        block_class = remat(TemporalTransformerBlock, self.remat)
        for index in range(self.num_layers):
            h = block_class(self.heads, channels // self.heads, self.attention_backend,
                            name=f"transformer_blocks_{index}", **kw)(h, context)
        h = Dense(channels, axes=("heads", "embed"), name="proj_out", **kw)(h)
        h = h.reshape(batch, height, width, frames, channels).transpose(0, 3, 1, 2, 4)  # (B, F, H, W, C)
        return h + x.astype(h.dtype)
