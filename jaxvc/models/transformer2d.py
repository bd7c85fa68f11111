"""The SD UNet's spatial transformer: diffusers ``Transformer2DModel`` (continuous input) + ``BasicTransformerBlock``.

Images (N, H, W, C) with N = B*F frames folded into the batch ((b f) order). Per block:
``h += attn1(norm1(h))`` (spatial self-attention over the H*W tokens of one frame), ``h += attn2(norm2(h), text)``
(cross-attention), ``h += ff(norm3(h))`` with a GEGLU feed-forward (exact-erf GELU). LayerNorm eps 1e-5, the outer
GroupNorm eps 1e-6, as in SD1.5.

The text context arrives once per video, (B, L, D), not repeated per frame. Cross-attention is independent per
query token, so attending the (B, F*H*W) queries of a whole video to its (B, L) context gives exactly what
diffusers computes with the context repeated per frame, without projecting keys/values F times.

Reference injection (VideoMaker's Personalized Injection Self-Attention, PISA): with ``reference_injection`` the
N = B*(F+1) images are B videos of F generated frames followed by one reference frame. In ``attn1`` each generated
frame attends over ``[its own H*W tokens; the reference's H*W tokens]`` (bidirectional, the same projections, no new
parameters); the reference tokens are updated too, once per frame, and their F outputs are averaged. With
``reference_cross_attention=False`` the reference frame skips ``attn2`` (the paper's "W/O Cross" ablation).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxvc.models.attention import Attention, rotary_2d
from jaxvc.models.layers import Conv, Dense, GroupNorm, LayerNorm, constrain, gelu_exact
from jaxvc.models.resnet import IMAGE_AXES
from jaxvc.train.compute import remat


class GEGLU(nn.Module):
    """``proj`` to 2*inner, split into [hidden, gate], return hidden * gelu_erf(gate) (diffusers ``GEGLU``)."""
    inner: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        projected = Dense(2 * self.inner, axes=("embed", "mlp"), name="proj", dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
        hidden, gate = jnp.split(projected, 2, axis=-1)
        return hidden * gelu_exact(gate)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu", mult=4)``: ``net.0`` = GEGLU, ``net.2`` = Linear(4C -> C)."""
    mult: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * channels, name="net_0", **kw)(x)
        return Dense(channels, axes=("mlp", "embed"), name="net_2", **kw)(h)


def reference_injected_self_attention(attn1: Attention, normed, num_frames: int, rotary=None):
    """PISA. normed (B*(F+1), L, C), the last frame of each video being the reference -> (B*(F+1), L, C).
    rotary: (cos, sin) (L, D) of the token grid; the reference tokens sit on the same grid as the frame's."""
    images, tokens, channels = normed.shape
    videos, generated = images // num_frames, num_frames - 1
    video = normed.reshape(videos, num_frames, tokens, channels)
    own = video[:, :generated].reshape(videos * generated, tokens, channels)                    # (B*F, L, C)
    reference = jnp.broadcast_to(video[:, generated:], (videos, generated, tokens, channels))
    if rotary is not None:  # (2L, D): own tokens then the reference's, each at its grid position
        rotary = tuple(jnp.concatenate([table, table], axis=0) for table in rotary)
    own_out, reference_out = attn1(own, reference_tokens=reference.reshape(videos * generated, tokens, channels),
                                   rotary=rotary)
    reference_out = reference_out.reshape(videos, generated, tokens, channels).mean(axis=1, keepdims=True)
    out = jnp.concatenate([own_out.reshape(videos, generated, tokens, channels), reference_out], axis=1)
    return out.reshape(images, tokens, channels)                                                # (B*(F+1), L, C)


class BasicTransformerBlock(nn.Module):
    """hidden (N, L, C) with N = B*frames; context (B, Lc, D) -> (N, L, C).

    ``num_frames`` (frames per video, the reference included) is needed only with ``reference_injection``.
    """
    heads: int
    head_dim: int
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    num_frames: int = 1
    reference_injection: bool = False
    reference_cross_attention: bool = True

    @nn.compact
    def __call__(self, hidden, context, rotary=None):
        """rotary: optional (cos, sin) (L, head_dim) of the token grid for the self-attention (``rotary_2d``)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, backend=self.attention_backend, **kw)
        normed = LayerNorm(1e-5, name="norm1", **kw)(hidden)
        attn1 = Attention(name="attn1", **attn)
        if self.reference_injection:
            hidden = hidden + reference_injected_self_attention(attn1, normed, self.num_frames, rotary)
        else:
            hidden = hidden + attn1(normed, rotary=rotary)

        normed = LayerNorm(1e-5, name="norm2", **kw)(hidden)
        videos, (frames_x_videos, tokens, channels) = context.shape[0], hidden.shape
        if frames_x_videos % videos:
            raise ValueError(f"BasicTransformerBlock: {frames_x_videos} images are not a multiple of the "
                             f"{videos} text contexts")
        per_video = normed.reshape(videos, (frames_x_videos // videos) * tokens, channels)  # (B, F*L, C)
        cross = Attention(name="attn2", **attn)(per_video, context=context)
        if self.reference_injection and not self.reference_cross_attention:
            # the reference frame (last of each video) skips cross-attention: zero its update
            frames = frames_x_videos // videos
            keep = (jnp.arange(frames) < frames - 1).astype(cross.dtype)
            cross = (cross.reshape(videos, frames, tokens, channels) * keep[None, :, None, None])
        hidden = hidden + cross.reshape(frames_x_videos, tokens, channels)  # (B*F, L, C)

        normed = LayerNorm(1e-5, name="norm3", **kw)(hidden)
        return hidden + FeedForward(name="ff", **kw)(normed)


class Transformer2DModel(nn.Module):
    """x (N, H, W, C), context (B, Lc, D) -> (N, H, W, C); residual around norm/proj_in/blocks/proj_out.

    ``use_linear_projection=False`` (SD1.5): ``proj_in``/``proj_out`` are 1x1 convs; True (SD2.x): linear layers.
    """
    heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    attention_backend: str = "xla"
    remat: bool | str = False  # or a remat policy name (jaxvc.train.compute)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    num_frames: int = 1
    reference_injection: bool = False
    reference_cross_attention: bool = True
    # 2-D rotary positions in the spatial self-attention (and PISA) with this base; None: none (SD / AnimateDiff).
    rope_theta: float | None = None

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = Dense(inner, axes=("embed", "heads"), name="proj_in", **kw)(h.reshape(n, height * width, channels))
        else:
            h = Conv(inner, (1, 1), padding=0, name="proj_in", **kw)(h).reshape(n, height * width, inner)
        # h: (N, H*W, inner)
        block_class = remat(BasicTransformerBlock, self.remat)
        rotary = None if self.rope_theta is None else rotary_2d(height, width, self.head_dim, self.rope_theta)
        for index in range(self.num_layers):
            h = block_class(self.heads, self.head_dim, self.attention_backend, name=f"transformer_blocks_{index}",
                            num_frames=self.num_frames, reference_injection=self.reference_injection,
                            reference_cross_attention=self.reference_cross_attention, **kw)(h, context, rotary)
        if self.use_linear_projection:
            h = Dense(channels, axes=("heads", "embed"), name="proj_out", **kw)(h).reshape(n, height, width, channels)
        else:
            h = Conv(channels, (1, 1), padding=0, name="proj_out", **kw)(h.reshape(n, height, width, inner))
        return constrain(h + x.astype(h.dtype), IMAGE_AXES)
