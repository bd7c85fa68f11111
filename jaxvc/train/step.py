"""The train step: gradients of the trainable subset, micro-batch accumulation, non-finite guard, EMA.

``make_train_step`` returns a pure function ``(state, batch) -> (state, metrics)``; the trainer jits it with the
state's and the batch's shardings and donates the state. Inside:

* only ``state.params`` (the trainable dict) is differentiated; frozen weights enter as constants;
* with ``accumulation_steps = k`` the global batch (B, ...) is viewed as k micro-batches of B/k rows
  (micro-batch i = rows i, i+k, i+2k, ..., so each device keeps its own rows and no data moves) and their
  gradients are averaged in a ``lax.scan``: one optimizer update for the whole global batch;
* a non-finite loss or gradient norm leaves parameters, optimizer state and EMA unchanged (selected with
  ``jnp.where`` inside the step), counts the skip, and the step counter still advances (the batch is consumed);
* the step's random key is ``fold_in(state.rng, state.step)`` (and ``fold_in(that, i)`` for micro-batch i), so a
  resumed run draws exactly the keys an uninterrupted run would.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jaxvc.train.state import TrainState, merge_params

PyTree = Any


def _micro_batches(batch: dict, k: int, constrain_batch: bool) -> dict:
    """(B, ...) -> (k, B/k, ...) with micro-batch i holding rows i, i+k, ..."""
    def one(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch axis {b} is not divisible by optim.accumulation_steps={k}")
        x = x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
        if constrain_batch:
            x = nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
        return x
    return jax.tree.map(one, batch)


def make_train_step(method, optimizer: optax.GradientTransformation, schedule: Callable,
                    accumulation_steps: int = 1, ema_decay: float | None = None,
                    constrain_micro_batches: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure train step for ``method`` (see the module docstring)."""
    k = int(accumulation_steps)
    if k < 1:
        raise ValueError(f"optim.accumulation_steps must be >= 1, got {k}")

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(trainable, micro_batch, rng):
            loss, metrics = method.loss(merge_params(trainable, state.frozen), micro_batch, rng)
            return loss.astype(jnp.float32), metrics

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if k == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, 0))
        else:
            micro = _micro_batches(batch, k, constrain_micro_batches)
            first = jax.tree.map(lambda x: x[0], micro)
            metrics_shape = jax.eval_shape(loss_fn, state.params, first, step_rng)[1]

            def body(carry, xs):
                index, micro_batch = xs
                grads_sum, loss_sum, metrics_sum = carry
                (loss, metrics), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_rng, index))
                return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
                        jax.tree.map(lambda a, m: a + m.astype(jnp.float32), metrics_sum, metrics)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metrics_shape))
            (grads, loss, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = loss / k
            metrics = jax.tree.map(lambda m: m / k, metrics)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_ema = state.ema
        if state.ema is not None:
            if ema_decay is None:
                raise ValueError("the state carries an EMA but optim.ema_decay is None")
            new_ema = keep_if_finite(
                jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema, new_params), state.ema)
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            opt_steps=state.opt_steps + (1 - skipped),
            params=keep_if_finite(new_params, state.params),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            ema=new_ema,
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + skipped)
        out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": jnp.asarray(schedule(state.opt_steps)),
               "finite": finite, "nonfinite_in_a_row": new_state.nonfinite_in_a_row,
               "nonfinite_total": new_state.nonfinite_total}
        out.update({f"method/{name}": value for name, value in metrics.items()})
        return new_state, out

    return train_step
