"""A small but real training method: a video denoiser trained with the DDPM epsilon-prediction loss.

It exists to exercise the trainer (sharding, frozen subsets, accumulation, checkpoints) with a model that has the
same anatomy as the real ones: a frozen pretrained-like stem (``time_embedding``, ``conv_in``), trainable spatial
ResNet-style blocks and temporal convolutions over frames, logical axis names on every parameter, activations
constrained at block boundaries, a configurable compute dtype and remat policy. Videos are (B, F, H, W, C) in [-1, 1].

Config (``config.model``): frames, height, width, channels, features, num_blocks, groups, time_features,
num_train_timesteps, sample_steps, num_samples, trainable (list of regexes over "/"-joined parameter paths).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvc.methods.base import Method
from jaxvc.models.embeddings import TimestepEmbedding, timestep_embedding
from jaxvc.models.layers import Conv, Dense, GroupNorm, constrain
from jaxvc.train.compute import compute_dtype, remat


def ddpm_alphas_cumprod(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """cumprod(1 - beta) for DDPM's linear beta schedule, float64 -> float32."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)


class ToyBlock(nn.Module):
    """Spatial residual block (norm, SiLU, conv, + time, norm, SiLU, conv) then a residual temporal conv."""
    features: int
    groups: int
    frames: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, temb):
        # h: (B*F, H, W, C); temb: (B*F, T)
        kw = dict(dtype=self.dtype)
        x = nn.silu(GroupNorm(self.groups, name="norm1", **kw)(h))
        x = Conv(self.features, (3, 3), name="conv1", **kw)(x)
        x = x + Dense(self.features, axes=("embed", "mlp"), name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None]
        x = nn.silu(GroupNorm(self.groups, name="norm2", **kw)(x))
        x = Conv(self.features, (3, 3), name="conv2", **kw)(x)
        h = constrain(h + x, ("batch", "height", "width", "channels"))
        bf, height, width, channels = h.shape
        batch = bf // self.frames
        # fold space into the batch for the temporal mixing: (B*H*W, F, C)
        t = h.reshape(batch, self.frames, height, width, channels).transpose(0, 2, 3, 1, 4)
        t = t.reshape(batch * height * width, self.frames, channels)
        t = Conv(self.features, (3,), name="temporal_conv", **kw)(nn.silu(t))
        t = t.reshape(batch, height, width, self.frames, channels).transpose(0, 3, 1, 2, 4)
        h = h + t.reshape(bf, height, width, channels)  # back to (B*F, H, W, C)
        return constrain(h, ("batch", "height", "width", "channels"))


class ToyDenoiserNet(nn.Module):
    """epsilon(x_t, t) for videos (B, F, H, W, C)."""
    channels: int = 3
    features: int = 8
    num_blocks: int = 2
    groups: int = 4
    time_features: int = 16
    dtype: Any = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x, timesteps):
        batch, frames, height, width, channels = x.shape
        kw = dict(dtype=self.dtype)
        temb = timestep_embedding(timesteps, self.time_features)
        temb = TimestepEmbedding(self.time_features, name="time_embedding", **kw)(temb)  # (B, T)
        temb = jnp.repeat(temb, frames, axis=0)  # (B*F, T): every frame gets its video's timestep
        h = x.reshape(batch * frames, height, width, channels)  # (B*F, H, W, C)
        h = Conv(self.features, (3, 3), name="conv_in", **kw)(h)
        block = remat(ToyBlock, self.remat_policy)
        for i in range(self.num_blocks):
            h = block(self.features, self.groups, frames, dtype=self.dtype, name=f"blocks_{i}")(h, temb)
        h = nn.silu(GroupNorm(self.groups, name="norm_out", **kw)(h))
        h = Conv(channels, (3, 3), name="conv_out", **kw)(h)
        return h.reshape(batch, frames, height, width, channels).astype(jnp.float32)


class ToyDenoiser(Method):
    """DDPM epsilon-prediction on small videos; the stem is frozen, the rest trains (configurable by regex)."""

    name = "toy"

    def __init__(self, config):
        self.config = config
        m = config.model
        self.shape = (int(m.frames), int(m.height), int(m.width), int(m.channels))
        self.net = ToyDenoiserNet(channels=int(m.channels), features=int(m.features), num_blocks=int(m.num_blocks),
                                  groups=int(m.groups), time_features=int(m.time_features),
                                  dtype=compute_dtype(config.get("compute_dtype", "float32")),
                                  remat_policy=config.get("remat_policy", "none"))
        self.num_train_timesteps = int(m.num_train_timesteps)
        self.alphas_cumprod = ddpm_alphas_cumprod(self.num_train_timesteps)
        self._trainable = [re.compile(p) for p in m.trainable]

    def _dummy_inputs(self, batch_size: int = 1):
        return jnp.zeros((batch_size, *self.shape), jnp.float32), jnp.zeros((batch_size,), jnp.int32)

    def abstract_params(self):
        return jax.eval_shape(self.net.init, jax.random.PRNGKey(0), *self._dummy_inputs())

    def init_params(self, rng):
        return nn.unbox(self.net.init(rng, *self._dummy_inputs()))

    def trainable(self, path: tuple[str, ...]) -> bool:
        joined = "/".join(path)
        return any(p.fullmatch(joined) for p in self._trainable)

    def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"video": jax.ShapeDtypeStruct((batch_size, *self.shape), jnp.float32)}

    def loss(self, params, batch: Mapping[str, jax.Array], rng):
        video = jnp.asarray(batch["video"], jnp.float32)
        if video.shape[1:] != self.shape:
            raise ValueError(f"toy denoiser: batch['video'] has shape {video.shape}, expected (B, {self.shape})")
        batch_size = video.shape[0]
        if "noise" in batch and "timesteps" in batch:
            # Noise drawn by the data pipeline per example: the loss then does not depend on how the batch is split.
            noise, timesteps = jnp.asarray(batch["noise"], jnp.float32), jnp.asarray(batch["timesteps"], jnp.int32)
        else:
            t_rng, n_rng = jax.random.split(rng)
            timesteps = jax.random.randint(t_rng, (batch_size,), 0, self.num_train_timesteps)
            noise = jax.random.normal(n_rng, video.shape, jnp.float32)
        abar = jnp.asarray(self.alphas_cumprod)[timesteps][:, None, None, None, None]
        noisy = jnp.sqrt(abar) * video + jnp.sqrt(1.0 - abar) * noise
        prediction = self.net.apply(params, noisy, timesteps)
        mse = jnp.mean(jnp.square(prediction - noise))
        return mse, {"mse": mse}

    def sample(self, params, rng) -> dict[str, jax.Array]:
        """Deterministic DDIM (eta = 0) from pure noise: {"samples": (N, F, H, W, C) in [-1, 1]}."""
        m = self.config.model
        steps = int(m.sample_steps)
        timesteps = np.linspace(self.num_train_timesteps - 1, 0, steps).round().astype(np.int32)
        abar = jnp.asarray(self.alphas_cumprod)
        x = jax.random.normal(rng, (int(m.num_samples), *self.shape), jnp.float32)
        for i, t in enumerate(timesteps):
            eps = self.net.apply(params, x, jnp.full((x.shape[0],), t, jnp.int32))
            x0 = (x - jnp.sqrt(1 - abar[t]) * eps) / jnp.sqrt(abar[t])
            abar_prev = abar[timesteps[i + 1]] if i + 1 < steps else jnp.float32(1.0)
            x = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev) * eps
        return {"samples": jnp.clip(x, -1.0, 1.0)}
