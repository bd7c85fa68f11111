"""The Wan video DiT (Wan 2.1 / 2.2; diffusers ``WanTransformer3DModel``) in Flax linen, channels last.

Latents (B, F, H, W, C) are cut into (p_t, p_h, p_w) patches by ``patch_embedding`` (a strided 3-D conv) and
flattened to L = f*h*w tokens in (frame, row, column) order. Each of the ``num_layers`` blocks does

    x += gate   * attn1(norm1(x) * (1 + scale) + shift)        self-attention, 3-D RoPE, RMS-normed q and k
    x +=          attn2(norm2(x), text [, image])               cross-attention to the text (and CLIP image tokens)
    x += c_gate * ffn(norm3(x) * (1 + c_scale) + c_shift)       tanh-GELU feed-forward

with the six modulation vectors = the block's ``scale_shift_table`` + a projection of the timestep embedding (one set
per video, or one per token when timesteps are given per token, as Wan 2.2 TI2V does to keep a clean first frame).
The output head modulates ``norm_out`` the same way, projects each token back to its patch and un-patchifies.

Numerics follow diffusers: LayerNorm statistics and the modulation in float32 (eps 1e-6, no affine, except the
cross-attention's ``norm2``), RMSNorm over all heads' channels, RoPE in interleaved pairs, timestep frequencies
``flip_sin_to_cos``. Parameter paths mirror diffusers' keys (``blocks_3/attn1/to_q/kernel`` <->
``blocks.3.attn1.to_q.weight``), so ``jaxvc.convert.wan`` loads a ``transformer/`` folder mechanically.

The text and the image context are separate arguments (diffusers concatenates them and splits them again assuming
512 text tokens). ``frame_offset`` shifts the frames' RoPE positions.

Reference stream (the disentangled identity/motion S2V method, ``jaxvc/methods/disentangled_s2v.py``): a clean
``reference_latent`` is patch-embedded by the same ``patch_embedding`` into tokens R placed *before* the video's
tokens X in every block's sequence, at RoPE frame 0 (the video's frames then start at 1). R has its own modulation:
the time projection plus ``reference_time_delta(silu(temb))`` (the method's LoRA on ``time_proj``, enabled for R
only). ``reference_mask`` drops reference tokens as keys of the self-attention (all of them: a plain text-to-video
step). The output is X's only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.models.attention import dot_product_attention
from jaxvc.models.embeddings import TimestepEmbedding, timestep_embedding
from jaxvc.models.layers import Conv, Dense, LayerNorm, RMSNorm, constrain, gelu_exact
from jaxvc.train.compute import remat, remat_policy

TOKEN_AXES = ("batch", "tokens", "channels")
HEAD_AXES = ("batch", "tokens", "heads", None)  # (B, L, H, Dh)


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Sizes and switches of ``WanTransformer3D`` (the fields of diffusers' config.json, same names and meaning).

    image_dim: width of the CLIP image tokens of Wan 2.1 I2V/FLF2V (their ``image_embedder``); None = text only.
    added_kv_proj_dim: the cross-attentions' extra key/value projections for those image tokens.
    pos_embed_seq_len: FLF2V's learned position table over the image tokens (first + last frame, 2 x 257).
    """
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    pos_embed_seq_len: int | None = None
    attention_backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # False / "none", True / "full", or a policy name of jaxvc.train.compute

    def __post_init__(self):
        remat_policy(self.remat)
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"Wan config: patch_size must be (t, h, w), got {self.patch_size}")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ValueError(f"Wan config: attention_head_dim={self.attention_head_dim} must be even and >= 6 "
                             "(RoPE splits it over frames, rows and columns)")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"Wan config: image_dim={self.image_dim} and added_kv_proj_dim={self.added_kv_proj_dim}"
                             " must be given together (the image tokens' embedder and their keys/values)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of each head that rotate with the frame, the row and the column (diffusers' split)."""
        spatial = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * spatial, spatial, spatial


# Named sizes (diffusers' configs of the released checkpoints; "tiny" for CPU tests and the synthetic world).
WAN_VARIANTS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=16, ffn_dim=48, num_layers=2),
    "wan21_t2v_1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan21_t2v_14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "wan21_i2v_14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, image_dim=1280,
                          added_kv_proj_dim=5120),
    "wan22_ti2v_5b": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
    # each of Wan 2.2 A14B's two experts (T2V: the 14 B text-to-video shape; I2V: 36 input channels, no CLIP tokens)
    "wan22_t2v_a14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "wan22_i2v_a14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36),
}


def wan_config(variant: str = "wan21_t2v_1.3b", **overrides) -> WanConfig:
    """``WanConfig`` for a named size; ``overrides`` set fields (``dtype=jnp.bfloat16``, ``remat="full"``, ...)."""
    if variant not in WAN_VARIANTS:
        raise ValueError(f"unknown Wan variant '{variant}'; known: {sorted(WAN_VARIANTS)}")
    return WanConfig(**{**WAN_VARIANTS[variant], **overrides})


# ------------------------------------------------------------------------------------------------------------
def wan_rotary(config: WanConfig, frames: int, height: int, width: int, frame_offset: int = 0):
    """(cos, sin), each (frames*height*width, head_dim // 2) float32: the rotation angle of every channel pair of
    every token of a (frames, height, width) token grid whose first frame sits at position ``frame_offset``.

    The first rope_dims[0]/2 pairs turn with the frame, the next with the row, the last with the column; pair i of
    a part of n channels turns by position * theta^(-2i/n) (diffusers' ``get_1d_rotary_pos_embed``, float64)."""
    last = frame_offset + frames - 1
    if max(last, height - 1, width - 1) >= config.rope_max_seq_len:
        raise ValueError(f"Wan RoPE: positions up to {max(last, height - 1, width - 1)} (frames {frame_offset}.."
                         f"{last}, {height} x {width} patches) exceed rope_max_seq_len={config.rope_max_seq_len}")
    parts = []
    positions = np.meshgrid(np.arange(frame_offset, frame_offset + frames), np.arange(height), np.arange(width),
                            indexing="ij")
    for dim, position in zip(config.rope_dims, positions):
        frequencies = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64)[:dim // 2] / dim)
        parts.append(position.reshape(-1, 1).astype(np.float64) * frequencies)  # (L, dim/2)
    angles = np.concatenate(parts, axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_interleaved_rotary(x, cos, sin):
    """x (B, L, H, D) with channel pairs (2i, 2i+1) rotated by the angles of (cos, sin) (L, D/2)."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.asarray(cos)[None, :, None, :], jnp.asarray(sin)[None, :, None, :]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class WanAttention(nn.Module):
    """Wan's attention: biased q/k/v/out projections, RMSNorm over all heads' channels of q and k.

    hidden (B, L, D); ``context`` (B, Lc, D) makes it cross-attention; ``image_context`` (B, Li, D) adds a second
    attention of the same queries over the image tokens' own keys/values (``add_k_proj``/``add_v_proj``), summed
    before ``to_out``."""
    heads: int
    head_dim: int
    eps: float = 1e-6
    backend: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, context=None, rotary=None, image_context=None, key_mask=None):
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(epsilon=self.eps, **kw)
        source = hidden if context is None else context
        split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)  # (B, L, D) -> (B, L, H, Dh)
        query = RMSNorm(name="norm_q", **norm)(Dense(inner, axes=("embed", "heads"), name="to_q", **kw)(hidden))
        key = RMSNorm(name="norm_k", **norm)(Dense(inner, axes=("embed", "heads"), name="to_k", **kw)(source))
        value = Dense(inner, axes=("embed", "heads"), name="to_v", **kw)(source)
        query, key, value = split(query), split(key), split(value)
        if rotary is not None:
            query, key = apply_interleaved_rotary(query, *rotary), apply_interleaved_rotary(key, *rotary)
            # Pinned where the projections left them (video tokens sharded): otherwise GSPMD gathers the keys
            # before the rotation and every device rotates the whole key sequence in float32 (same gathers; the
            # Wan 14B sampling plan's roofline 1.94 -> 1.67 s per step on v5e:2x4, fsdp=8).
            query, key, value = (constrain(t, HEAD_AXES) for t in (query, key, value))
        out = dot_product_attention(query, key, value, backend=self.backend, key_mask=key_mask)
        if image_context is not None:
            image_key = Dense(inner, axes=("embed", "heads"), name="add_k_proj", **kw)(image_context)
            image_key = RMSNorm(name="norm_added_k", **norm)(image_key)
            image_value = Dense(inner, axes=("embed", "heads"), name="add_v_proj", **kw)(image_context)
            out = out + dot_product_attention(query, split(image_key), split(image_value), backend=self.backend)
        out = out.reshape(*out.shape[:2], inner)
        return Dense(hidden.shape[-1], axes=("heads", "embed"), name="to_out_0", **kw)(out)


class _Projection(nn.Module):
    """A module holding one Dense named ``proj`` (diffusers' activation modules: ``net.0.proj``)."""
    features: int
    axes: tuple[str, str] = ("embed", "mlp")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Dense(self.features, axes=self.axes, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with a GELU activation: ``net.0.proj`` -> GELU (tanh or exact) -> ``net.2``."""
    inner: int
    out_features: int | None = None
    approximate: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _Projection(self.inner, name="net_0", **kw)(x)
        h = jax.nn.gelu(h, approximate=True) if self.approximate else gelu_exact(h)
        return Dense(self.out_features or x.shape[-1], axes=("mlp", "embed"), name="net_2", **kw)(h)


def _modulation(table, embedding):
    """``table`` (1, k, D) + ``embedding`` -> k float32 vectors that broadcast over (B, L, D) tokens.

    embedding: (B, k or 1, D) per video -> each (B, 1, D); or (B, L, k or 1, D) per token -> each (B, L, D)."""
    table, embedding = table.astype(jnp.float32), embedding.astype(jnp.float32)
    if embedding.ndim == 3:
        rows = table + embedding  # (B, k, D)
        return [rows[:, i:i + 1] for i in range(table.shape[1])]
    rows = table[None] + embedding  # (B, L, k, D)
    return [rows[:, :, i] for i in range(table.shape[1])]


class WanBlock(nn.Module):
    """One Wan transformer block; tokens (B, L, D), ``time_projection`` (B, 6D) or (B, L, 6D), or a pair of
    (B, 6D) for the first ``reference_length`` tokens and for the rest. ``key_mask`` (B, L): self-attention keys."""
    config: WanConfig

    @nn.compact
    def __call__(self, tokens, text, time_projection, rotary, image=None, reference_length: int = 0,
                 key_mask=None):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        dim = tokens.shape[-1]
        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / dim ** 0.5, (None, None, "norm")),
            (1, 6, dim), cfg.param_dtype)
        rows = lambda projection: _modulation(table, projection.reshape(*projection.shape[:-1], 6, dim))
        if isinstance(time_projection, tuple):  # the reference's tokens first, then the video's: (B, 1, D) each
            is_reference = (jnp.arange(tokens.shape[1]) < reference_length)[None, :, None]
            modulation = [jnp.where(is_reference, r, v) for r, v in zip(*map(rows, time_projection))]
        else:  # (B[, L], 6D) -> (B[, L], 6, D)
            modulation = rows(time_projection)
        shift, scale, gate, c_shift, c_scale, c_gate = modulation
        attention = dict(heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, eps=cfg.eps,
                         backend=cfg.attention_backend, **kw)
        f32 = jnp.float32
        # Every residual sum in float32, rounded back to the compute dtype after each step (as diffusers does).
        normed = LayerNorm(cfg.eps, use_affine=False, name="norm1")(tokens) * (1 + scale) + shift
        attended = WanAttention(name="attn1", **attention)(normed.astype(cfg.dtype), rotary=rotary, key_mask=key_mask)
        tokens = (tokens.astype(f32) + attended.astype(f32) * gate).astype(cfg.dtype)

        normed = LayerNorm(cfg.eps, name="norm2")(tokens).astype(cfg.dtype) if cfg.cross_attn_norm else tokens
        tokens = tokens + WanAttention(name="attn2", **attention)(normed, context=text, image_context=image)

        normed = LayerNorm(cfg.eps, use_affine=False, name="norm3")(tokens) * (1 + c_scale) + c_shift
        fed = FeedForward(cfg.ffn_dim, name="ffn", **kw)(normed.astype(cfg.dtype))
        out = tokens.astype(f32) + fed.astype(f32) * c_gate
        return constrain(out.astype(cfg.dtype), TOKEN_AXES)


class ImageEmbedding(nn.Module):
    """Wan 2.1 I2V's ``image_embedder``: LayerNorm -> exact-GELU MLP -> LayerNorm (eps 1e-5, affine), plus FLF2V's
    learned position table over the (first + last frame) image tokens."""
    config: WanConfig

    @nn.compact
    def __call__(self, image_tokens):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        if cfg.pos_embed_seq_len is not None:
            if image_tokens.shape[1] != cfg.pos_embed_seq_len:
                raise ValueError(f"Wan image tokens: {image_tokens.shape[1]} tokens, expected pos_embed_seq_len="
                                 f"{cfg.pos_embed_seq_len} (the first and the last frame's CLIP tokens)")
            table = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                               (1, cfg.pos_embed_seq_len, image_tokens.shape[-1]), cfg.param_dtype)
            image_tokens = image_tokens + table.astype(image_tokens.dtype)
        h = LayerNorm(1e-5, name="norm1", **kw)(image_tokens)
        h = FeedForward(image_tokens.shape[-1], cfg.inner_dim, approximate=False, name="ff", **kw)(h)
        return LayerNorm(1e-5, name="norm2", **kw)(h)


class ConditionEmbedder(nn.Module):
    """Timesteps -> (embedding (B[, L], D), its 6-fold projection (B[, L], 6D)); text (B, Lt, text_dim) -> (B, Lt, D)
    through ``text_embedder`` (Linear -> tanh-GELU -> Linear); image tokens through ``image_embedder``."""
    config: WanConfig

    @nn.compact
    def __call__(self, timesteps, text, image=None):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        frequencies = timestep_embedding(timesteps.reshape(-1), cfg.freq_dim, flip_sin_to_cos=True,
                                         downscale_freq_shift=0.0)  # (B*[L], freq_dim) float32
        frequencies = frequencies.reshape(*timesteps.shape, cfg.freq_dim)
        temb = TimestepEmbedding(cfg.inner_dim, name="time_embedder", param_dtype=cfg.param_dtype)(frequencies)
        projection = Dense(6 * cfg.inner_dim, axes=("embed", "mlp"), name="time_proj", **kw)(nn.silu(temb))
        text_embedder = _TextProjection(cfg.inner_dim, name="text_embedder", **kw)
        image = None if image is None else ImageEmbedding(cfg, name="image_embedder")(image)
        return temb, projection, text_embedder(text), image


class _TextProjection(nn.Module):
    """diffusers ``PixArtAlphaTextProjection(act_fn="gelu_tanh")``: linear_1 -> tanh-GELU -> linear_2."""
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, text):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.features, axes=("embed", "mlp"), name="linear_1", **kw)(text)
        return Dense(self.features, axes=("mlp", "embed"), name="linear_2", **kw)(jax.nn.gelu(h, approximate=True))


class WanTransformer3D(nn.Module):
    """latents (B, F, H, W, C_in), timesteps (B,) or per token (B, L), text (B, Lt, text_dim)
    [, image tokens (B, Li, image_dim)] -> the flow prediction (B, F, H, W, C_out).

    ``reference_latent`` (B, Fr, H, W, C_in) adds the reference stream (module docstring; per-video timesteps
    only), ``reference_time_delta`` maps silu(temb) (B, D) to an addition (B, 6D) to the reference's time
    projection, ``reference_mask`` (B, Lr) bool keeps (True) or drops reference tokens.
    ``return_intermediates=True`` also returns ``{"blocks_i": (B, L, D)}``, every block's output tokens (the
    reference's first, when there are any)."""
    config: WanConfig

    @nn.compact
    def __call__(self, latents, timesteps, text, image=None, *, frame_offset: int = 0, reference_latent=None,
                 reference_time_delta=None, reference_mask=None, return_intermediates: bool = False):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        batch = latents.shape[0]
        grid = self._grid(latents, "latents")
        num_tokens = math.prod(grid)
        if (image is None) != (cfg.image_dim is None):
            raise ValueError(f"Wan: image tokens {'missing' if image is None else 'given'}, but the model has "
                             f"image_dim={cfg.image_dim}")
        timesteps = jnp.asarray(timesteps, jnp.float32)
        allowed = ((batch,),) if reference_latent is not None else ((batch,), (batch, num_tokens))
        if timesteps.shape not in allowed:
            raise ValueError(f"Wan: timesteps of shape {timesteps.shape}; expected "
                             f"{' or per token '.join(str(a) for a in allowed)}"
                             + (" (a reference stream takes one timestep per video, not per token)"
                                if reference_latent is not None else ""))
        patch_embedding = Conv(cfg.inner_dim, cfg.patch_size, strides=cfg.patch_size, padding=0,
                               name="patch_embedding", **kw)
        embed = lambda x: patch_embedding(x.astype(cfg.dtype)).reshape(batch, -1, cfg.inner_dim)  # (B, f*h*w, D)
        temb, time_projection, text, image = ConditionEmbedder(cfg, name="condition_embedder")(timesteps, text, image)

        tokens, key_mask, reference_length = embed(latents), None, 0
        if reference_latent is None:
            rotary = wan_rotary(cfg, *grid, frame_offset=frame_offset)
        else:
            reference_grid = self._grid(reference_latent, "reference_latent")
            if reference_grid[1:] != grid[1:]:
                raise ValueError(f"Wan: reference_latent {tuple(reference_latent.shape)} and latents "
                                 f"{tuple(latents.shape)} differ in height or width")
            reference_tokens = embed(reference_latent)  # (B, Lr, D): frames frame_offset.., then the video's
            reference_length = reference_tokens.shape[1]
            reference_rotary = wan_rotary(cfg, *reference_grid, frame_offset=frame_offset)
            video_rotary = wan_rotary(cfg, *grid, frame_offset=frame_offset + reference_grid[0])
            rotary = tuple(np.concatenate(pair) for pair in zip(reference_rotary, video_rotary))
            tokens = jnp.concatenate([reference_tokens, tokens], axis=1)  # (B, Lr + L, D)
            reference_projection = time_projection
            if reference_time_delta is not None:
                reference_projection = time_projection + reference_time_delta(nn.silu(temb)).astype(
                    time_projection.dtype)
            time_projection = (reference_projection, time_projection)
            keep = (jnp.ones((batch, reference_length), bool) if reference_mask is None
                    else jnp.broadcast_to(jnp.asarray(reference_mask, bool), (batch, reference_length)))
            key_mask = jnp.concatenate([keep, jnp.ones((batch, num_tokens), bool)], axis=1)
        tokens = constrain(tokens, TOKEN_AXES)

        block_class = remat(WanBlock, cfg.remat, static_argnums=(6,))
        intermediates = {}
        for index in range(cfg.num_layers):
            tokens = block_class(cfg, name=f"blocks_{index}")(tokens, text, time_projection, rotary, image,
                                                              reference_length, key_mask)
            if return_intermediates:
                intermediates[f"blocks_{index}"] = tokens
        tokens = tokens[:, reference_length:]  # the video's tokens

        table = self.param("scale_shift_table", nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / cfg.inner_dim ** 0.5,
            (None, None, "norm")), (1, 2, cfg.inner_dim), cfg.param_dtype)
        shift, scale = _modulation(table, temb[..., None, :])  # temb (B[, L], D) added to both rows
        normed = LayerNorm(cfg.eps, use_affine=False, name="norm_out")(tokens) * (1 + scale) + shift
        p_t, p_h, p_w = cfg.patch_size
        out = Dense(cfg.out_channels * p_t * p_h * p_w, axes=("embed", "mlp"), name="proj_out",
                    **kw)(normed.astype(cfg.dtype))  # (B, L, p_t*p_h*p_w*C_out)
        # un-patchify: (B, f, h, w, p_t, p_h, p_w, C) -> (B, f, p_t, h, p_h, w, p_w, C) -> (B, F, H, W, C)
        out = out.reshape(batch, *grid, p_t, p_h, p_w, cfg.out_channels)
        out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(*latents.shape[:4], cfg.out_channels)
        return (out, intermediates) if return_intermediates else out

    def _grid(self, latents, name: str) -> tuple[int, int, int]:
        """(f, h, w) patches of (B, F, H, W, C) latents, checking channels and divisibility."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"Wan: {name} must be (B, F, H, W, {cfg.in_channels}) (in_channels={cfg.in_channels}), "
                             f"got {tuple(latents.shape)}")
        frames, height, width = latents.shape[1:4]
        p_t, p_h, p_w = cfg.patch_size
        if frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"Wan: {name} size (F, H, W) = {(frames, height, width)} is not divisible by the patch "
                             f"size {cfg.patch_size}")
        return frames // p_t, height // p_h, width // p_w


def abstract_wan_params(config: WanConfig):
    """The boxed ShapeDtypeStruct tree of ``{"params": ...}`` without running an initialiser."""
    p_t, p_h, p_w = config.patch_size
    latents = jax.ShapeDtypeStruct((1, p_t, p_h, p_w, config.in_channels), jnp.float32)
    text = jax.ShapeDtypeStruct((1, 1, config.text_dim), jnp.float32)
    image = None
    if config.image_dim is not None:
        image = jax.ShapeDtypeStruct((1, config.pos_embed_seq_len or 1, config.image_dim), jnp.float32)
    return jax.eval_shape(WanTransformer3D(config).init, jax.random.key(0), latents, jnp.zeros((1,)), text, image)
