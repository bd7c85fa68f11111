"""DDIM sampling (Song et al. 2021) exactly as diffusers' ``DDIMScheduler`` computes it, as pure functions.

``ddim_timesteps`` reproduces ``set_timesteps`` (spacing "leading" | "linspace" | "trailing", ``steps_offset``) on
the host; ``ddim_step`` reproduces ``step`` with array arithmetic only, so it runs under jit / lax.scan with a
traced timestep. Two diffusers details are kept on purpose because checkpoints were sampled with them:

* the "previous" timestep is always ``t - T // num_inference_steps``, whatever the spacing (so with "linspace"
  or "trailing" it may differ from the next entry of the timestep list by one);
* a negative previous timestep uses ``final_alpha_cumprod``: 1 if ``set_alpha_to_one`` else alpha_bar_0.

Dynamic thresholding (Imagen) is not implemented: it is meant for pixel-space models, and none of jaxvc's are.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxvc.diffusion.schedule import (NoiseSchedule, _check_prediction_type, load_scheduler_config, predict_x0,
                                      schedule_from_diffusers_config)

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def ddim_timesteps(num_inference_steps: int, *, num_train_timesteps: int = 1000, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
    """The descending int64 timesteps diffusers' ``DDIMScheduler.set_timesteps`` produces (host-side, static)."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"ddim: num_inference_steps={num_inference_steps} must be in [1, {num_train_timesteps}]")
    if timestep_spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        return timesteps + steps_offset  # diffusers applies steps_offset to "leading" only
    if timestep_spacing == "trailing":
        step_ratio = num_train_timesteps / num_inference_steps
        return np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    raise ValueError(f"ddim: timestep_spacing={timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")


class DDIMStepOutput(NamedTuple):
    prev_sample: jnp.ndarray            # x_{t_prev}
    pred_original_sample: jnp.ndarray   # predicted x0 (after clipping, as diffusers returns it)


def ddim_step(schedule: NoiseSchedule, model_out, t, x_t, *, num_inference_steps: int, eta=0.0, noise=None,
              prediction_type: str = "epsilon", clip_sample: bool = False, clip_sample_range: float = 1.0,
              set_alpha_to_one: bool = True, use_clipped_model_output: bool = False) -> DDIMStepOutput:
    """One DDIM update x_t -> x_{t - T//n} (diffusers ``DDIMScheduler.step``).

    t: int scalar (may be traced). eta: 0 = deterministic DDIM, 1 = DDPM-like; when eta may be non-zero, pass
    ``noise`` (standard normal, shaped like x_t), the ``variance_noise`` of diffusers. Config flags are static.
    """
    _check_prediction_type(prediction_type)
    num_train = schedule.num_train_timesteps
    t = jnp.asarray(t, jnp.int32)
    prev_t = t - num_train // num_inference_steps
    ac = schedule.alphas_cumprod
    final_alpha = jnp.ones((), ac.dtype) if set_alpha_to_one else ac[0]
    alpha_t = ac[t]
    alpha_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)], final_alpha)
    beta_t = 1 - alpha_t
    dtype = x_t.dtype
    alpha_t, alpha_prev, beta_t = (v.astype(dtype) for v in (alpha_t, alpha_prev, beta_t))

    if prediction_type == "epsilon":
        pred_x0 = (x_t - jnp.sqrt(beta_t) * model_out) / jnp.sqrt(alpha_t)
        pred_eps = model_out
    elif prediction_type in ("sample", "sample_skip"):  # sample_skip: jaxvc's preconditioned x0 output
        pred_x0 = model_out if prediction_type == "sample" else predict_x0(schedule, x_t, model_out, t, prediction_type)
        pred_eps = (x_t - jnp.sqrt(alpha_t) * pred_x0) / jnp.sqrt(beta_t)
    else:  # v_prediction
        pred_x0 = jnp.sqrt(alpha_t) * x_t - jnp.sqrt(beta_t) * model_out
        pred_eps = jnp.sqrt(alpha_t) * model_out + jnp.sqrt(beta_t) * x_t

    if clip_sample:
        pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

    # Posterior variance between the two steps; eta scales its standard deviation.
    variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
    std_dev = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
        pred_eps = (x_t - jnp.sqrt(alpha_t) * pred_x0) / jnp.sqrt(beta_t)

    direction = jnp.sqrt(1 - alpha_prev - std_dev ** 2) * pred_eps
    prev = jnp.sqrt(alpha_prev) * pred_x0 + direction
    if noise is not None:
        prev = prev + std_dev * noise
    elif not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError(f"ddim_step: eta={eta} adds noise; pass noise= (a standard normal array shaped like x_t)")
    return DDIMStepOutput(prev.astype(dtype), pred_x0.astype(dtype))


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash by identity (it holds arrays)
class DDIMSampler:
    """A configured DDIM sampler for ``jaxvc.diffusion.sampling.sample``: static timesteps plus a step function.

    Field defaults are diffusers' ``DDIMScheduler`` defaults; ``from_diffusers_config`` reads a real
    ``scheduler_config.json`` (SD1.5 ships leading spacing, steps_offset=1, set_alpha_to_one=False,
    clip_sample=False). ``eta`` may be a Python float or a (traced) scalar array.
    """

    schedule: NoiseSchedule
    num_inference_steps: int
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    eta: Any = 0.0
    use_clipped_model_output: bool = False

    def __post_init__(self):
        _check_prediction_type(self.prediction_type)
        self.timesteps  # validates spacing and step count early

    @property
    def timesteps(self) -> np.ndarray:
        """Model-facing timesteps, one per step, descending (int64, host)."""
        return ddim_timesteps(self.num_inference_steps, num_train_timesteps=self.schedule.num_train_timesteps,
                              timestep_spacing=self.timestep_spacing, steps_offset=self.steps_offset)

    @property
    def needs_noise(self) -> bool:
        return not (isinstance(self.eta, (int, float)) and self.eta == 0)

    def step(self, model_out, step_index, x, noise=None) -> DDIMStepOutput:
        t = jnp.asarray(self.timesteps, jnp.int32)[step_index]
        return ddim_step(self.schedule, model_out, t, x, num_inference_steps=self.num_inference_steps, eta=self.eta,
                         noise=noise, prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                         clip_sample_range=self.clip_sample_range, set_alpha_to_one=self.set_alpha_to_one,
                         use_clipped_model_output=self.use_clipped_model_output)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | os.PathLike, num_inference_steps: int,
                              eta: Any = 0.0, **overrides) -> "DDIMSampler":
        """From a diffusers DDIM/DDPM/PNDM/... scheduler config (dict, json file or folder); keys it lacks take
        ``DDIMScheduler``'s defaults. ``overrides`` replace fields (e.g. ``timestep_spacing="linspace"``)."""
        cfg = load_scheduler_config(config)
        if cfg.get("thresholding", False):
            raise ValueError("DDIMSampler: the scheduler config sets thresholding=true (dynamic thresholding), "
                             "which jaxvc does not implement; set it to false")
        fields = dict(timestep_spacing=cfg.get("timestep_spacing", "leading"),
                      steps_offset=int(cfg.get("steps_offset", 0)),
                      prediction_type=cfg.get("prediction_type", "epsilon"),
                      clip_sample=bool(cfg.get("clip_sample", True)),
                      clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
                      set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)))
        fields.update(overrides)
        return cls(schedule=schedule_from_diffusers_config(cfg), num_inference_steps=num_inference_steps, eta=eta,
                   **fields)
