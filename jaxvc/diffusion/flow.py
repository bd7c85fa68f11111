"""Rectified-flow / flow-matching schedule and Euler sampler for Wan-style DiTs (diffusers
``FlowMatchEulerDiscreteScheduler`` semantics, static ``shift``; dynamic shifting off).

Convention (sigma = noise level in [0, 1], timestep = 1000 * sigma):
    x_sigma = (1 - sigma) x0 + sigma noise                     (flow_add_noise; diffusers ``scale_noise``)
    target  = d x_sigma / d sigma = noise - x0                 (flow_target: what the model predicts)
    Euler:  x_{sigma_next} = x_sigma + (sigma_next - sigma) * model_out
The shift maps sigma -> shift*sigma / (1 + (shift - 1) sigma), spending more steps at high noise (Wan: 3 to 5).

Like diffusers, the inference sigmas are a linspace between the *shifted* training sigma_max and sigma_min, shifted
once more; ``flow_sigmas`` reproduces that float64/float32 sequence bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.diffusion.schedule import load_scheduler_config


def shift_sigmas(sigmas, shift: float):
    """The static time shift sigma -> shift*sigma / (1 + (shift - 1) sigma) (works on numpy or jax arrays)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_inference_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000):
    """(timesteps (n,) float32, sigmas (n+1,) float32 ending in 0) exactly as ``set_timesteps(n)`` makes them."""
    if num_inference_steps < 1:
        raise ValueError(f"flow: num_inference_steps must be >= 1, got {num_inference_steps}")
    if shift <= 0:
        raise ValueError(f"flow: shift must be > 0, got {shift}")
    # Training sigmas in float32 (the scheduler's __init__), already shifted once.
    train_t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    train_sigmas = shift_sigmas(train_t / np.float32(num_train_timesteps), np.float32(shift)).astype(np.float32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    # Inference: float64 linspace between them, shifted again, then float32.
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_inference_steps)
    sigmas = shift_sigmas(t / num_train_timesteps, float(shift)).astype(np.float32)
    timesteps = (sigmas * np.float32(num_train_timesteps)).astype(np.float32)
    return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


def _per_example(sigma, ndim: int, dtype):
    sigma = jnp.asarray(sigma, dtype)
    return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def flow_add_noise(x0, noise, sigma):
    """x_sigma = (1 - sigma) x0 + sigma noise; sigma scalar or one per example."""
    s = _per_example(sigma, x0.ndim, x0.dtype)
    return s * noise + (1.0 - s) * x0


def flow_target(x0, noise):
    """The velocity a flow-matching model is trained to predict: noise - x0."""
    return noise - x0


def flow_predict_x0(x_t, model_out, sigma):
    """The clean sample implied by a velocity prediction at noise level sigma."""
    return x_t - _per_example(sigma, x_t.ndim, x_t.dtype) * model_out


def sample_flow_sigmas(rng, batch_size: int, *, shift: float = 1.0, num_train_timesteps: int = 1000):
    """Training noise levels: u ~ U{1..T}/T (the scheduler's training grid), then the static shift. Returns
    (sigmas (B,) float32, timesteps = T * sigmas (B,) float32)."""
    idx = jax.random.randint(rng, (batch_size,), 1, num_train_timesteps + 1)
    sigmas = shift_sigmas(idx.astype(jnp.float32) / num_train_timesteps, shift)
    return sigmas, sigmas * num_train_timesteps


class FlowStepOutput(NamedTuple):
    prev_sample: jnp.ndarray
    pred_original_sample: jnp.ndarray   # x - sigma * v


def flow_euler_step(model_out, sigma, sigma_next, x, *, stochastic: bool = False, noise=None) -> FlowStepOutput:
    """One Euler step from sigma to sigma_next (diffusers ``FlowMatchEulerDiscreteScheduler.step``). With
    ``stochastic`` the step re-noises the predicted x0 to sigma_next with fresh ``noise`` instead."""
    x32 = x.astype(jnp.float32)  # diffusers upcasts the sample, then casts the result to the model output dtype
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    x0 = x32 - sigma * model_out
    if stochastic:
        if noise is None:
            raise ValueError("flow_euler_step: stochastic sampling needs noise= (standard normal shaped like x)")
        prev = (1.0 - sigma_next) * x0 + sigma_next * noise
    else:
        prev = x32 + (sigma_next - sigma) * model_out
    return FlowStepOutput(prev.astype(model_out.dtype), x0.astype(model_out.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatchEulerSampler:
    """A configured flow-matching Euler sampler for ``jaxvc.diffusion.sampling.sample``.

    The model is called with float timesteps 1000*sigma (as Wan's transformer expects) and must return the
    velocity noise - x0."""

    num_inference_steps: int
    shift: float = 1.0
    num_train_timesteps: int = 1000
    stochastic_sampling: bool = False

    def __post_init__(self):
        flow_sigmas(self.num_inference_steps, shift=self.shift, num_train_timesteps=self.num_train_timesteps)

    @property
    def timesteps(self) -> np.ndarray:
        return flow_sigmas(self.num_inference_steps, shift=self.shift, num_train_timesteps=self.num_train_timesteps)[0]

    @property
    def sigmas(self) -> np.ndarray:
        return flow_sigmas(self.num_inference_steps, shift=self.shift, num_train_timesteps=self.num_train_timesteps)[1]

    @property
    def needs_noise(self) -> bool:
        return self.stochastic_sampling

    def step(self, model_out, step_index, x, noise=None) -> FlowStepOutput:
        sigmas = jnp.asarray(self.sigmas)
        return flow_euler_step(model_out, sigmas[step_index], sigmas[step_index + 1], x,
                               stochastic=self.stochastic_sampling, noise=noise)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | os.PathLike, num_inference_steps: int,
                              **overrides) -> "FlowMatchEulerSampler":
        """From a ``FlowMatchEulerDiscreteScheduler`` config (dict, json file or folder). Options that change the
        sigma sequence beyond the static shift are refused rather than silently ignored."""
        cfg = load_scheduler_config(config)
        unsupported = {k: cfg[k] for k in ("use_dynamic_shifting", "invert_sigmas", "shift_terminal",
                                           "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                       if cfg.get(k)}
        if unsupported:
            raise ValueError(f"FlowMatchEulerSampler: scheduler config options {unsupported} are not supported "
                             "(only a static shift is)")
        fields = dict(shift=float(cfg.get("shift", 1.0)), num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                      stochastic_sampling=bool(cfg.get("stochastic_sampling", False)))
        fields.update(overrides)
        return cls(num_inference_steps=num_inference_steps, **fields)
