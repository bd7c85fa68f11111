"""Diffusion training-loss helpers shared by the methods: timestep / noise draws, masked element-wise losses,
per-example weights (min-SNR-gamma; the x0-space 1/(1 - alpha_bar) weight of CogVideoX fine-tuning, method (e)).

Reductions follow the reference training scripts: the error is averaged over each example's (masked) elements,
multiplied by that example's weight, then averaged over the batch. Errors are computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxvc.diffusion.schedule import (NoiseSchedule, add_noise, get_target, min_snr_weight, predict_x0,
                                      _check_prediction_type)

LOSS_TYPES = ("mse", "l1")
WEIGHTINGS = (None, "min_snr", "inverse_one_minus_alpha_bar")
LOSS_SPACES = ("target", "x0")


TIMESTEP_BIAS_STRATEGIES = ("none", "later", "earlier")


def check_timestep_bias(strategy: str, multiplier: float, portion: float) -> None:
    """Clear errors for bad timestep-bias settings (plain Python: safe before JAX initialises its backends)."""
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(f"timestep bias strategy {strategy!r}: expected one of {TIMESTEP_BIAS_STRATEGIES}")
    if not 0.0 < portion <= 1.0 or multiplier <= 0.0:
        raise ValueError(f"timestep bias: need 0 < portion <= 1 (got {portion}) and multiplier > 0 (got {multiplier})")


def timestep_weights(num_train_timesteps: int, strategy: str = "none", multiplier: float = 1.0,
                     portion: float = 0.25):
    """(T,) relative sampling weights of the training timesteps, as diffusers' ``--timestep_bias_strategy``:
    "later" multiplies the weight of the last ``portion`` of the timesteps (the noisiest) by ``multiplier``,
    "earlier" the first ``portion``; "none" is uniform."""
    check_timestep_bias(strategy, multiplier, portion)
    weights = jnp.ones((num_train_timesteps,), jnp.float32)
    count = max(1, int(portion * num_train_timesteps))  # int() as diffusers does
    if strategy == "later":
        weights = weights.at[num_train_timesteps - count:].multiply(multiplier)
    elif strategy == "earlier":
        weights = weights.at[:count].multiply(multiplier)
    return weights


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int = 1000, *, min_timestep: int = 0,
                     max_timestep: int | None = None, weights=None):
    """One training timestep per example on {min_timestep, ..., max_timestep - 1} (default all T): uniform, or
    drawn in proportion to `weights` ((T,), e.g. `timestep_weights`)."""
    max_timestep = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < max_timestep <= num_train_timesteps:
        raise ValueError(f"sample_timesteps: need 0 <= min_timestep ({min_timestep}) < max_timestep ({max_timestep})"
                         f" <= num_train_timesteps ({num_train_timesteps})")
    if weights is None:
        return jax.random.randint(rng, (batch_size,), min_timestep, max_timestep, dtype=jnp.int32)
    logits = jnp.log(jnp.asarray(weights, jnp.float32)[min_timestep:max_timestep])
    return (min_timestep + jax.random.categorical(rng, logits, shape=(batch_size,))).astype(jnp.int32)


def sample_noise(rng, shape, dtype=jnp.float32):
    """Standard-normal training noise."""
    return jax.random.normal(rng, shape, dtype)


def per_example_loss(pred, target, *, loss_type: str = "mse", mask=None):
    """(B,) mean over each example's elements of (pred - target)^2 ("mse") or |pred - target| ("l1").

    mask: optional, broadcastable to pred (e.g. (B, F, H, W, 1) for a per-pixel subject mask); the mean is then
    sum(mask * err) / sum(mask) per example (an example whose mask is all zero contributes 0).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if pred.shape != target.shape:
        raise ValueError(f"per_example_loss: prediction shape {pred.shape} != target shape {target.shape}")
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    err = jnp.square(diff) if loss_type == "mse" else jnp.abs(diff)
    axes = tuple(range(1, err.ndim))
    if mask is None:
        return jnp.mean(err, axis=axes)
    try:
        mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), err.shape)
    except ValueError as e:
        raise ValueError(f"per_example_loss: mask shape {jnp.shape(mask)} does not broadcast to {err.shape}") from e
    total = jnp.sum(mask, axis=axes)
    return jnp.where(total > 0, jnp.sum(mask * err, axis=axes) / jnp.maximum(total, 1e-12), 0.0)


def x0_space_weight(schedule: NoiseSchedule, t):
    """1 / (1 - alpha_bar_t): the weight CogVideoX fine-tuning puts on its x0-space loss (it turns the x0 error of a
    v-prediction model back into a v-space error: x0 - x0_hat = sqrt(1 - alpha_bar_t) (v_hat - v))."""
    return 1.0 / (1.0 - jnp.take(schedule.alphas_cumprod, jnp.asarray(t, jnp.int32)))


def diffusion_loss(schedule: NoiseSchedule, model_out, x0, noise, t, *, prediction_type: str = "epsilon",
                   x_t=None, loss_type: str = "mse", mask=None, loss_space: str = "target",
                   weighting: str | None = None, snr_gamma: float = 5.0, max_weight: float | None = None):
    """Weighted diffusion loss; returns (scalar loss, (B,) weighted per-example losses).

    loss_space "target": compare model_out with the prediction target (eps, v or x0) of ``prediction_type``;
    "x0": convert model_out to a predicted x0 at x_t and compare with x0 (method (e)). x_t defaults to
    add_noise(x0, noise, t); pass it when the model saw something else (e.g. a rescaled q_sample).
    weighting: None; "min_snr" (min-SNR-gamma for the loss's space); "inverse_one_minus_alpha_bar" (1/(1-ab_t)).
    max_weight: clip the per-example weight at this value (1/(1-ab_t) grows without bound as t -> 0).
    """
    _check_prediction_type(prediction_type)
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"loss_space={loss_space!r} is not one of {LOSS_SPACES}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")
    if loss_space == "target":
        pred, target = model_out, get_target(schedule, x0, noise, t, prediction_type)
    else:
        x_t = add_noise(schedule, x0, noise, t) if x_t is None else x_t
        pred, target = predict_x0(schedule, x_t, model_out, t, prediction_type), x0
    losses = per_example_loss(pred, target, loss_type=loss_type, mask=mask)
    weight = None
    if weighting == "min_snr":
        # The weight belongs to the space the loss is measured in: an x0-space loss is a "sample" loss.
        space_type = prediction_type if loss_space == "target" else "sample"
        weight = min_snr_weight(schedule, t, snr_gamma, space_type)
    elif weighting == "inverse_one_minus_alpha_bar":
        weight = x0_space_weight(schedule, t)
    if weight is not None:
        losses = losses * (weight if max_weight is None else jnp.minimum(weight, max_weight))
    return jnp.mean(losses), losses
