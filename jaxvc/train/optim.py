"""Optax chains from ``config.optim``: global-norm clipping, then the optimizer ``optim.name``, on the LR schedule of
jaxvc/train/schedules.py.

* ``adamw`` (default): AdamW, ``b1``/``b2``/``eps``;
* ``adafactor``: Adafactor's factored second moments (Shazeer & Stern 2018): a matrix whose two largest dimensions are
  both >= ``factored_min_dim`` keeps one row and one column of statistics instead of a full moment, so the state is
  a small fraction of AdamW's two full moments (what lets a larger model or batch fit a pod slice); update RMS
  clipped at 1, no momentum, no parameter-scale multiplier, so ``lr`` means what it means for AdamW;
* ``lion``: Lion (Chen et al. 2023), the sign of an interpolated momentum: one moment, ``b1``/``b2`` (0.9/0.99 in
  the paper), usually with a 3-10x smaller ``lr`` and a larger ``weight_decay`` than AdamW;
* ``sgd``: SGD with momentum ``b1`` (0: none).

``mu_dtype`` ("bfloat16") stores the first moment (AdamW, Lion, SGD) in that dtype: half its memory.
``weight_decay`` is decoupled and scaled by the learning rate for every optimizer (as in AdamW: each step subtracts
lr * weight_decay * parameter). It never touches normalization scales, biases or any other parameter with fewer
than two dimensions (decaying a norm's scale towards zero or a bias towards zero is not regularization, it is
damage).
Gradient accumulation is not an optimizer wrapper here: the train step sums micro-batch gradients inside one jitted
call (jaxvc/train/step.py), so one optimizer update sees the gradient of the whole global batch.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxvc.train.schedules import build_schedule

PyTree = Any
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies: matrices/conv kernels/embeddings, not norms, biases or 1-d leaves."""
    def one(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return leaf.ndim >= 2 and names[-1] not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(one, params)


OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")


def _mu_dtype(optim_config):
    name = optim_config.get("mu_dtype", "") or ""
    if name not in ("", "float32", "bfloat16", "float16"):
        raise ValueError(f"optim.mu_dtype '{name}' is not one of '' (the parameters' dtype), float32, bfloat16, "
                         f"float16")
    return jnp.dtype(name) if name else None


def _optimizer(optim_config, schedule) -> optax.GradientTransformation:
    name = optim_config.get("name", "adamw") or "adamw"
    b1, weight_decay = float(optim_config.b1), float(optim_config.weight_decay)
    mu_dtype = _mu_dtype(optim_config)
    if name == "adamw":
        return optax.adamw(schedule, b1=b1, b2=float(optim_config.b2), eps=float(optim_config.eps),
                           mu_dtype=mu_dtype, weight_decay=weight_decay, mask=decay_mask)
    if name == "lion":
        return optax.lion(schedule, b1=b1, b2=float(optim_config.b2), mu_dtype=mu_dtype, weight_decay=weight_decay,
                          mask=decay_mask)
    if name == "adafactor":
        if mu_dtype is not None:
            raise ValueError("optim.mu_dtype: adafactor keeps no first moment; leave mu_dtype empty")
        min_dim = int(optim_config.get("factored_min_dim", 128))
        if min_dim < 1:
            raise ValueError(f"optim.factored_min_dim must be >= 1, got {min_dim}")
        return optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim),
                           optax.clip_by_block_rms(1.0),
                           optax.add_decayed_weights(weight_decay, decay_mask),
                           optax.scale_by_learning_rate(schedule))
    if name == "sgd":
        parts = [optax.trace(decay=b1, accumulator_dtype=mu_dtype)] if b1 > 0 else []
        return optax.chain(*parts, optax.add_decayed_weights(weight_decay, decay_mask),
                           optax.scale_by_learning_rate(schedule))
    raise ValueError(f"optim.name '{name}' is not one of {', '.join(OPTIMIZERS)}")


def build_optimizer(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for the trainable parameters."""
    schedule = build_schedule(optim_config, total_steps)
    parts = []
    clip = float(optim_config.get("clip_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(_optimizer(optim_config, schedule))
    return optax.chain(*parts), schedule
