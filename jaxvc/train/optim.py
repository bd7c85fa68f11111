"""Optax chains from ``config.optim``: global-norm clipping, then AdamW with a decay mask, on an LR schedule.

Weight decay never touches normalization scales, biases or any other parameter with fewer than two dimensions
(decaying a norm's scale towards zero or a bias towards zero is not regularization, it is damage).
Gradient accumulation is not an optimizer wrapper here: the train step sums micro-batch gradients inside one jitted
call (jaxvc/train/step.py), so one optimizer update sees the gradient of the whole global batch.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

PyTree = Any
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def build_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """constant | warmup_constant | warmup_cosine (decay over ``decay_steps`` or the run's ``total_steps``)."""
    name = optim_config.schedule
    lr = float(optim_config.lr)
    warmup = int(optim_config.get("warmup_steps", 0) or 0)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "warmup_constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                    [warmup]) if warmup else optax.constant_schedule(lr)
    if name == "warmup_cosine":
        decay_steps = optim_config.get("decay_steps")
        if decay_steps is not None and decay_steps <= warmup:
            raise ValueError(f"optim.decay_steps ({decay_steps}) must exceed optim.warmup_steps ({warmup}) "
                             f"for the warmup_cosine schedule")
        # A run shorter than its warmup (tiny tests) never reaches the decay.
        decay_steps = decay_steps or max(total_steps, warmup + 1)
        end = lr * float(optim_config.get("end_lr_ratio", 0.0))
        return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, int(decay_steps), end)
    raise ValueError(f"optim.schedule '{name}' is not one of constant, warmup_constant, warmup_cosine")


def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: matrices/conv kernels/embeddings, not norms, biases or 1-d leaves."""
    def one(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return leaf.ndim >= 2 and names[-1] not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(one, params)


def build_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for the trainable parameters."""
    schedule = build_schedule(optim_config, total_steps)
    parts = []
    clip = float(optim_config.get("clip_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                             eps=float(optim_config.eps), weight_decay=float(optim_config.weight_decay),
                             mask=decay_mask))
    return optax.chain(*parts), schedule
