"""Learning-rate schedules from ``config.optim`` (``optim.schedule``), each a function of the optimizer step.

* ``constant``; ``warmup_constant``: linear warmup from 0 over ``warmup_steps``, then ``lr``;
* ``warmup_cosine`` / ``warmup_linear``: warmup, then a cosine / linear decay to ``lr * end_lr_ratio`` at
  ``decay_steps`` (default: the run's ``steps``);
* ``wsd`` (warmup-stable-decay): warmup, ``lr`` held, then a cooldown over the last ``cooldown_fraction`` of
  ``decay_steps`` to ``lr * end_lr_ratio``, shaped ``cooldown_shape``: ``1-sqrt`` (the best of those compared by
  Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"), ``linear`` or
  ``cosine``. The stable phase does not depend on the run's length, so a scaling study can branch cooldowns of
  several lengths off one run's checkpoints (resume with a larger ``steps``) instead of training each from scratch;
* ``rsqrt``: warmup, then ``lr * sqrt(warmup_steps / step)`` (inverse square root; ``lr / sqrt(step)`` without
  warmup).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_constant", "warmup_cosine", "warmup_linear", "wsd", "rsqrt")
COOLDOWN_SHAPES = {
    "1-sqrt": lambda x: 1.0 - jnp.sqrt(x),
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + jnp.cos(jnp.pi * x)),
}


def _warmup_then(lr: float, warmup: int, after) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup`` steps, then ``after(step)``."""
    if not warmup:
        return after

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return jnp.where(step < warmup, lr * step / warmup, after(step))
    return schedule


def build_schedule(optim_config, total_steps: int) -> optax.Schedule:
    name = optim_config.schedule
    lr = float(optim_config.lr)
    warmup = int(optim_config.get("warmup_steps", 0) or 0)
    end = lr * float(optim_config.get("end_lr_ratio", 0.0) or 0.0)
    if warmup < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}")
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "warmup_constant":
        return _warmup_then(lr, warmup, lambda step: jnp.full(jnp.shape(step), lr, jnp.float32))
    if name == "rsqrt":
        timescale = max(warmup, 1)
        return _warmup_then(lr, warmup, lambda step: lr * jnp.sqrt(timescale / jnp.maximum(
            jnp.asarray(step, jnp.float32), timescale)))
    if name not in ("warmup_cosine", "warmup_linear", "wsd"):
        raise ValueError(f"optim.schedule '{name}' is not one of {', '.join(SCHEDULES)}")
    decay_steps = optim_config.get("decay_steps")
    if decay_steps is not None and decay_steps <= warmup:
        raise ValueError(f"optim.decay_steps ({decay_steps}) must exceed optim.warmup_steps ({warmup}) "
                         f"for the {name} schedule")
    # A run shorter than its warmup (tiny tests) never reaches the decay.
    decay_steps = int(decay_steps or max(total_steps, warmup + 1))
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, decay_steps, end)
    if name == "warmup_linear":
        return _warmup_then(lr, warmup, optax.linear_schedule(lr, end, decay_steps - warmup, transition_begin=warmup))
    fraction = float(optim_config.get("cooldown_fraction", 0.2))
    shape = optim_config.get("cooldown_shape", "1-sqrt")
    if shape not in COOLDOWN_SHAPES:
        raise ValueError(f"optim.cooldown_shape '{shape}' is not one of {', '.join(COOLDOWN_SHAPES)}")
    cooldown = round(fraction * decay_steps)
    if not 0.0 < fraction <= 1.0 or cooldown < 1 or decay_steps - cooldown < warmup:
        raise ValueError(f"optim.cooldown_fraction {fraction} of {decay_steps} decay steps must give at least one "
                         f"cooldown step and leave the {warmup} warmup steps before it")
    stable_end = decay_steps - cooldown

    def cooldown_value(step):
        x = jnp.clip((jnp.asarray(step, jnp.float32) - stable_end) / cooldown, 0.0, 1.0)
        return end + (lr - end) * COOLDOWN_SHAPES[shape](x)
    return _warmup_then(lr, warmup, cooldown_value)
