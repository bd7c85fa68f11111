"""Discrete-time (DDPM) noise schedules and the algebra around them, as diffusers' schedulers define it.

A schedule is the table alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1. Everything a diffusion model
needs from it is a pure function of arrays, so it jits and can be indexed by traced timesteps:

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps                        (add_noise)
    v   = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0                       (get_velocity)
    predict_x0 / predict_eps: invert the above for an "epsilon", "v_prediction" or "sample" model output
    "sample_skip" (jaxvc's, not diffusers'): x0_hat = c_skip x_t / sqrt(alpha_bar_t) + c_out F, Karras et al. 2022's
    preconditioning with sigma_data = 0.5 (see ``skip_coefficients``)
    SNR_t = alpha_bar_t / (1 - alpha_bar_t) and the min-SNR-gamma loss weights (Hang et al. 2023).

Schedules supported (diffusers ``beta_schedule``): "linear", "scaled_linear" (SD1.5: 0.00085 -> 0.012 over 1000
steps, linear in sqrt(beta)), "squaredcos_cap_v2" (Nichol & Dhariwal cosine), or explicit ``trained_betas``;
optionally the SD3/CogVideoX SNR shift (``snr_shift_scale``) and the zero-terminal-SNR rescale of Lin et al. 2023
(``rescale_betas_zero_snr``). The table is computed once on the host in float64 and stored as float32 (diffusers
builds it in float32 torch; the two agree to ~1e-6 relative, far inside the 1e-5 parity bound).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "sample_skip")
# "sample_skip": the data's standard deviation assumed by the preconditioning (EDM's value for images in [-1, 1]).
SKIP_SIGMA_DATA = 0.5
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class NoiseSchedule(NamedTuple):
    """The per-timestep tables (a pytree: pass it into jit or close over it). Index 0 is the least noisy step."""

    betas: jnp.ndarray            # (T,) float32
    alphas_cumprod: jnp.ndarray   # (T,) float32, alpha_bar_t

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers ``betas_for_alpha_bar`` with the "cosine" transform (beta_schedule="squaredcos_cap_v2")."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
                     for i in range(num_train_timesteps)], dtype=np.float64)


def _rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, on alpha_bar: shift sqrt(alpha_bar) so the last step is 0, rescale so the first
    step keeps its value. (diffusers applies it to the betas in DDIMScheduler and to alpha_bar in the CogVideoX
    schedulers; both are this same map on alpha_bar.)"""
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab ** 2


def make_schedule(beta_schedule: str = "scaled_linear", *, beta_start: float = 0.00085, beta_end: float = 0.012,
                  num_train_timesteps: int = 1000, trained_betas=None, rescale_betas_zero_snr: bool = False,
                  snr_shift_scale: float = 1.0, host: bool = False) -> NoiseSchedule:
    """Build a schedule. Defaults are Stable Diffusion 1.5's ("scaled_linear", 0.00085 -> 0.012, 1000 steps).
    ``host=True``: numpy float32 tables, concrete even inside ``jit`` (the multistep samplers derive their
    coefficients from them on the host).

    ``snr_shift_scale`` s != 1 divides the SNR by s (alpha_bar <- alpha_bar / (s + (1 - s) alpha_bar)), as
    CogVideoX's schedulers do before the optional zero-terminal-SNR rescale.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"schedule: trained_betas must be a non-empty 1-D array, got shape {betas.shape}")
        num_train_timesteps = betas.shape[0]
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"schedule: beta_schedule={beta_schedule!r} is not one of {BETA_SCHEDULES}")
    if np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError(f"schedule: betas must lie in (0, 1); got min {betas.min()} max {betas.max()}")

    alphas_cumprod = np.cumprod(1.0 - betas)
    if snr_shift_scale != 1.0:
        if snr_shift_scale <= 0:
            raise ValueError(f"schedule: snr_shift_scale must be > 0, got {snr_shift_scale}")
        alphas_cumprod = alphas_cumprod / (snr_shift_scale + (1 - snr_shift_scale) * alphas_cumprod)
    if rescale_betas_zero_snr:
        alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
    if snr_shift_scale != 1.0 or rescale_betas_zero_snr:
        # Betas consistent with the modified table (diffusers' DDIMScheduler keeps exactly these).
        betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    xp = np if host else jnp
    return NoiseSchedule(betas=xp.asarray(betas, xp.float32), alphas_cumprod=xp.asarray(alphas_cumprod, xp.float32))


# Keys of a diffusers scheduler_config.json that change the alpha_bar table.
_SCHEDULE_DEFAULTS = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
                      "trained_betas": None, "rescale_betas_zero_snr": False}


def load_scheduler_config(config: Mapping[str, Any] | str | os.PathLike) -> dict:
    """A diffusers scheduler config as a dict: given a dict, a ``scheduler_config.json`` file, or a folder holding
    one (e.g. ``<pipeline>/scheduler``)."""
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scheduler config: no file at {path} (expected a diffusers scheduler_config.json)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"scheduler config: {path} is not valid JSON: {err}") from err


def schedule_from_diffusers_config(config: Mapping[str, Any] | str | os.PathLike, *,
                                   host: bool = False) -> NoiseSchedule:
    """The schedule a diffusers DDPM/DDIM/CogVideoX scheduler config describes; missing keys take diffusers'
    class defaults (note: "linear" 1e-4 -> 0.02, not SD1.5's values), CogVideoX's ``snr_shift_scale`` included."""
    cfg = load_scheduler_config(config)
    kw = {k: cfg.get(k, v) for k, v in _SCHEDULE_DEFAULTS.items()}
    snr_shift_scale = cfg.get("snr_shift_scale", 1.0)
    if "snr_shift_scale" not in cfg and str(cfg.get("_class_name", "")).startswith("CogVideoX"):
        snr_shift_scale = 3.0  # the CogVideoX schedulers' class default
    return make_schedule(kw.pop("beta_schedule"), snr_shift_scale=snr_shift_scale, host=host, **kw)


def _per_example(values: jnp.ndarray, t, ndim: int) -> jnp.ndarray:
    """values[t] shaped to broadcast against an ndim-dimensional batch (t scalar or (B,))."""
    v = jnp.take(values, jnp.asarray(t, jnp.int32))
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


def alpha_sigma(schedule: NoiseSchedule, t, ndim: int = 0, dtype=jnp.float32):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) broadcastable to an ndim-dimensional batch."""
    ab = _per_example(schedule.alphas_cumprod, t, ndim).astype(dtype)
    return jnp.sqrt(ab), jnp.sqrt(1 - ab)


def add_noise(schedule: NoiseSchedule, x0, noise, t):
    """Forward process q(x_t | x0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t is a scalar or one timestep per example."""
    a, s = alpha_sigma(schedule, t, x0.ndim, x0.dtype)
    return a * x0 + s * noise


def get_velocity(schedule: NoiseSchedule, x0, noise, t):
    """The v-prediction target sqrt(ab_t) noise - sqrt(1 - ab_t) x0 (diffusers ``get_velocity``)."""
    a, s = alpha_sigma(schedule, t, x0.ndim, x0.dtype)
    return a * noise - s * x0


def skip_coefficients(schedule: NoiseSchedule, t, ndim: int = 0, dtype=jnp.float32):
    """(c_x, c_out) of the "sample_skip" output: x0_hat = c_x x_t + c_out F.

    In EDM's terms (sigma = sqrt(1 - ab) / sqrt(ab), the noise level of x_t / sqrt(ab) = x0 + sigma eps):
    c_skip = sigma_d^2 / (sigma^2 + sigma_d^2) and c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2), so
    c_x = c_skip / sqrt(ab) = sigma_d^2 sqrt(ab) / (1 - ab + sigma_d^2 ab) and
    c_out = sqrt(1 - ab) sigma_d / sqrt(1 - ab + sigma_d^2 ab), both finite at ab = 0.
    At small t the output is the input plus a small correction (x0 ~ x_t); at large t it is F itself, as an x0 model.
    Why: an x0 model must rebuild every pixel from its input at every t, and a tiny one trained briefly does not
    (its error at t = 5 was 70x that of returning the input); v-prediction has the skip but weighs the input
    fully up to mid t (sigma_d = 1), where the noise must then be cancelled exactly."""
    a, s = alpha_sigma(schedule, t, ndim, dtype)
    d2 = SKIP_SIGMA_DATA ** 2
    denominator = s ** 2 + d2 * a ** 2
    return d2 * a / denominator, s * SKIP_SIGMA_DATA / jnp.sqrt(denominator)


def get_target(schedule: NoiseSchedule, x0, noise, t, prediction_type: str = "epsilon"):
    """What a model of the given prediction type is trained to output."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    if prediction_type == "sample_skip":
        c_x, c_out = skip_coefficients(schedule, t, x0.ndim, x0.dtype)
        return (x0 - c_x * add_noise(schedule, x0, noise, t)) / c_out
    return x0


def predict_x0(schedule: NoiseSchedule, x_t, model_out, t, prediction_type: str = "epsilon"):
    """The clean sample implied by a model output at x_t (diffusers' ``pred_original_sample``)."""
    _check_prediction_type(prediction_type)
    a, s = alpha_sigma(schedule, t, x_t.ndim, x_t.dtype)
    if prediction_type == "epsilon":
        return (x_t - s * model_out) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_out
    if prediction_type == "sample_skip":
        c_x, c_out = skip_coefficients(schedule, t, x_t.ndim, x_t.dtype)
        return c_x * x_t + c_out * model_out
    return model_out


def predict_eps(schedule: NoiseSchedule, x_t, model_out, t, prediction_type: str = "epsilon"):
    """The noise implied by a model output at x_t (diffusers' ``pred_epsilon``)."""
    _check_prediction_type(prediction_type)
    a, s = alpha_sigma(schedule, t, x_t.ndim, x_t.dtype)
    if prediction_type == "epsilon":
        return model_out
    if prediction_type == "v_prediction":
        return a * model_out + s * x_t
    x0 = predict_x0(schedule, x_t, model_out, t, prediction_type) if prediction_type == "sample_skip" else model_out
    return (x_t - a * x0) / s


def snr(schedule: NoiseSchedule, t):
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at timestep(s) t (diffusers ``compute_snr``)."""
    a, s = alpha_sigma(schedule, t)
    return (a / s) ** 2


def min_snr_weight(schedule: NoiseSchedule, t, gamma: float = 5.0, prediction_type: str = "epsilon"):
    """Per-example min-SNR-gamma loss weight for a loss on the model's own target (as diffusers' training scripts):
    epsilon: min(SNR, gamma) / SNR;  v_prediction: min(SNR, gamma) / (SNR + 1);  sample: min(SNR, gamma);
    sample_skip: min(SNR, gamma) c_out^2 (its target error is the x0 error / c_out^2).

    For epsilon the weight is written min(1, gamma / SNR), the same number, which stays 1 (its limit) at
    zero terminal SNR instead of 0/0."""
    _check_prediction_type(prediction_type)
    ratio = snr(schedule, t)
    if prediction_type == "epsilon":
        return jnp.minimum(1.0, gamma / ratio)
    clipped = jnp.minimum(ratio, gamma)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1)
    if prediction_type == "sample_skip":
        return clipped * skip_coefficients(schedule, t)[1] ** 2
    return clipped
