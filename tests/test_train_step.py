"""The train step's mechanics on one device: frozen weights stay put and get no gradient, gradient accumulation equals
one big batch, non-finite steps are skipped (and stop the run), EMA, remat policies, bf16, and the loop's outputs
(TensorBoard scalars incl. MFU, sample videos, config.json).

Compiles use ``compiler_options={"xla_backend_optimization_level": 0}`` (a config field): 4x faster XLA:CPU
compiles; every comparison below is between programs compiled the same way.
"""
import glob
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.config_utils import get_config
from jaxvc.methods.toy_denoiser import ToyDenoiser
from jaxvc.train import distributed, toy_data
from jaxvc.train.loop import NonFiniteError, Trainer, train
from jaxvc.train.state import merge_params, split_params

FAST = ["compiler_options={'xla_backend_optimization_level': 0}", "matmul_precision=highest", "model.num_blocks=1",
        "progress_bar=false", "checkpoint.every=0"]


def fast_config(*overrides):
    return get_config("configs/toy.py:tiny", FAST + list(overrides))


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_steps(trainer, state, batches):
    losses = []
    for local in batches:
        state, metrics = trainer.step(state, distributed.global_batch(local, trainer.mesh, trainer.batch_size))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_frozen_params_do_not_change_and_get_no_gradient(tmp_path):
    config = fast_config("steps=2")
    method = ToyDenoiser(config)
    trainer = Trainer(config, method, tmp_path)
    state = trainer.init_state()
    before = host(state)
    data = toy_data.from_config(config)
    state, _ = run_steps(trainer, state, [next(data), next(data)])
    after = host(state)
    for a, b in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(after.frozen)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params))]
    assert all(changed), "every trainable leaf should move after two AdamW steps"
    assert int(after.step) == 2 and int(after.opt_steps) == 2

    # No gradient computation for frozen weights: the step differentiates only the trainable dict, so its program
    # has fewer convolutions than one where the stem (conv_in) is trainable too (no weight gradient for conv_in).
    def conv_count(trainable_patterns):
        cfg = fast_config(f"model.trainable={trainable_patterns!r}")
        t = Trainer(cfg, ToyDenoiser(cfg), tmp_path / "count")
        batch = {"video": jax.ShapeDtypeStruct((8, 2, 8, 8, 3), jnp.float32)}
        from jaxvc.train.step import make_train_step

        step = make_train_step(t.method, t.optimizer, t.schedule)
        return jax.jit(step).lower(t.abstract_state, batch).as_text().count("stablehlo.convolution")

    frozen_stem = conv_count(("params/blocks_.*", "params/norm_out/.*", "params/conv_out/.*"))
    all_trainable = conv_count(("params/.*",))
    assert frozen_stem < all_trainable, (frozen_stem, all_trainable)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # Noise and timesteps come with each example, so the loss of a batch does not depend on how it is split.
    base = ["data.with_noise=true", "steps=2"]
    big = Trainer(fast_config(*base), ToyDenoiser(fast_config(*base)), tmp_path / "big")
    accum_config = fast_config(*base, "optim.accumulation_steps=4")
    accum = Trainer(accum_config, ToyDenoiser(accum_config), tmp_path / "accum")
    state = big.init_state()
    state_copy = jax.tree.map(jnp.copy, state)
    data = toy_data.from_config(big.config)
    batches = [next(data), next(data)]
    big_state, big_losses = run_steps(big, state, batches)
    acc_state, acc_losses = run_steps(accum, state_copy, batches)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(host(acc_state.params)), jax.tree.leaves(host(big_state.params))):
        assert relative_error(a, b) < 1e-5
    for a, b in zip(jax.tree.leaves(host(acc_state.opt_state)), jax.tree.leaves(host(big_state.opt_state))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


class PoisonableToy(ToyDenoiser):
    """The toy loss times batch["scale"] (NaN in a batch poisons that step's loss and gradients)."""

    def loss(self, params, batch, rng):
        loss, metrics = super().loss(params, {"video": batch["video"]}, rng)
        return loss * jnp.mean(batch["scale"]), metrics


class PoisonedData(toy_data.ToyVideoData):
    def __init__(self, poison_from: int, **kwargs):
        super().__init__(**kwargs)
        self.poison_from = poison_from

    def __next__(self):
        index = self.next_batch
        batch = super().__next__()
        scale = np.nan if index >= self.poison_from else 1.0
        batch["scale"] = np.full((batch["video"].shape[0],), scale, np.float32)
        return batch


def test_nonfinite_steps_are_skipped_and_stop_the_run(tmp_path):
    config = fast_config("steps=6", "checkpoint.every=1", "checkpoint.keep=10", "max_nonfinite_in_a_row=2",
                         "checkpoint.use_async=false")
    trainer = Trainer(config, PoisonableToy(config), tmp_path)
    data = PoisonedData(2, global_batch_size=8, frames=2, height=8, width=8)
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        trainer.fit(data)
    # Steps 1, 2 trained; step 3 was skipped and saved; step 4 (second in a row) stopped the run before any save.
    assert trainer.checkpointer.all_steps() == [1, 2, 3]
    good, _, _ = trainer.restore(2)
    skipped, data_state, _ = trainer.restore(3)
    good, skipped = host(good), host(skipped)
    for a, b in zip(jax.tree.leaves((good.params, good.opt_state)), jax.tree.leaves((skipped.params, skipped.opt_state))):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a))
    assert int(skipped.step) == 3 and int(skipped.opt_steps) == 2
    assert int(skipped.nonfinite_in_a_row) == 1 and int(skipped.nonfinite_total) == 1
    assert data_state["next_batch"] == 3


def test_ema_of_trainable_params(tmp_path):
    config = fast_config("optim.ema_decay=0.75", "steps=1")
    trainer = Trainer(config, ToyDenoiser(config), tmp_path)
    state = trainer.init_state()
    initial = host(state.params)
    np.testing.assert_array_equal(jax.tree.leaves(host(state.ema))[0], jax.tree.leaves(initial)[0])
    state, _ = run_steps(trainer, state, [next(toy_data.from_config(config))])
    new, ema = host(state.params), host(state.ema)
    for p0, p1, e in zip(jax.tree.leaves(initial), jax.tree.leaves(new), jax.tree.leaves(ema)):
        np.testing.assert_allclose(e, 0.75 * p0 + 0.25 * p1, rtol=1e-6, atol=1e-8)
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape, state.ema))) <= set(
        jax.tree.leaves(jax.tree.map(lambda x: x.shape, state.params)))


def test_remat_policies_and_bf16_compute():
    from jaxvc.train.compute import remat_policy

    base = fast_config()
    method = ToyDenoiser(base)
    options = {"xla_backend_optimization_level": 0}
    key = jax.random.PRNGKey(0)
    params = jax.jit(method.init_params).lower(key).compile(options)(key)
    trainable, frozen = split_params(params, method.trainable)
    batch = {"video": next(toy_data.from_config(base))["video"]}

    def loss_and_grads(m):
        fn = jax.jit(jax.value_and_grad(lambda t: m.loss(merge_params(t, frozen), batch, jax.random.PRNGKey(1))[0]))
        return fn.lower(trainable).compile(options)(trainable)

    ref_loss, ref_grads = loss_and_grads(method)
    for policy in ("full", "dots_saveable"):
        loss, grads = loss_and_grads(ToyDenoiser(fast_config(f"remat_policy={policy}")))
        assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert relative_error(a, b) < 1e-5, policy
    with pytest.raises(ValueError, match="remat_policy 'sometimes'"):
        remat_policy("sometimes")
    bf16_loss, bf16_grads = loss_and_grads(ToyDenoiser(fast_config("compute_dtype=bfloat16")))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))  # fp32 params, fp32 grads
    assert abs(float(bf16_loss) - float(ref_loss)) < 0.05 * float(ref_loss)
    assert float(bf16_loss) != float(ref_loss)


def read_scalars(logdir):
    """tag -> [(step, value)] from tensorboardX event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
                else:
                    out.setdefault(value.tag, []).append((event.step, None))
    return out


def test_loop_writes_tensorboard_samples_and_config(tmp_path):
    config = fast_config("steps=2", "sample_every=2", "peak_flops_per_device=1e12", "optim.ema_decay=0.9")
    result = train(config, ToyDenoiser(config), lambda rows: toy_data.from_config(config, rows), tmp_path)
    assert [h["step"] for h in result.history] == [1, 2]
    scalars = read_scalars(tmp_path / "tensorboard")
    for tag in ("train/loss", "train/grad_norm", "train/learning_rate", "perf/samples_per_s", "perf/step_time_s",
                "perf/mfu", "perf/data_wait_s", "perf/data_wait_fraction", "method/mse"):
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [h["loss"] for h in result.history], rtol=1e-6)
    assert scalars["train/learning_rate"][0][1] == 0.0 and scalars["train/learning_rate"][1][1] > 0  # warmup
    assert all(0 < v < 1 for _, v in scalars["perf/mfu"])
    assert "samples/samples" in scalars
    gifs = sorted(os.listdir(tmp_path / "samples" / "step_00000002"))
    assert gifs == ["samples_0.gif", "samples_1.gif"]
    assert (tmp_path / "config.json").exists()
    # Running again finds the finished run's checkpoint and does nothing.
    again = train(config, ToyDenoiser(config), lambda rows: toy_data.from_config(config, rows), tmp_path)
    assert again.start_step == 2 and again.history == []


def test_checkpoints_keep_latest_and_best(tmp_path):
    from jaxvc.train.checkpoint import Checkpointer

    cfg = get_config("configs/toy.py").checkpoint
    cfg.keep, cfg.keep_best, cfg.use_async = 2, 1, False
    checkpointer = Checkpointer(tmp_path, cfg)
    for step, loss in zip(range(1, 6), [5.0, 1.0, 4.0, 3.0, 2.0]):
        checkpointer.save(step, {"x": jnp.full((3,), step, jnp.float32)}, {"next_batch": step}, {"method": "toy"},
                          {"loss": loss})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 4, 5]  # the best (loss 1.0) and the latest two
    tree, data_state, saved_config = checkpointer.restore(2, {"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(tree["x"]), [2, 2, 2])
    assert data_state == {"next_batch": 2} and saved_config == {"method": "toy"}
    checkpointer.close()


class HostLoadedToy(ToyDenoiser):
    """Weights 'read from files': the same numpy arrays whatever the key (the path for converted checkpoints)."""

    init_params_jittable = False

    def __init__(self, config, weights):
        super().__init__(config)
        self.weights = weights

    def init_params(self, rng):
        return jax.tree.map(np.copy, self.weights)


def test_host_loaded_weights_and_checkpoints_without_frozen(tmp_path):
    config = fast_config("steps=1", "checkpoint.save_frozen=false")
    key = jax.random.PRNGKey(3)
    base = ToyDenoiser(config)
    weights = jax.tree.map(lambda x: np.asarray(x) + 1.0, jax.device_get(
        jax.jit(base.init_params).lower(key).compile({"xla_backend_optimization_level": 0})(key)))
    method = HostLoadedToy(config, weights)
    trainer = Trainer(config, method, tmp_path)
    expected = weights
    result = trainer.fit(toy_data.from_config(config))
    frozen_expected = split_params(expected, method.trainable)[1]
    for a, b in zip(jax.tree.leaves(host(result.state.frozen)), jax.tree.leaves(frozen_expected), strict=True):
        np.testing.assert_array_equal(a, b)
    # the checkpoint holds no frozen weights; restoring rebuilds them from the method
    metadata = trainer.checkpointer.manager.item_metadata(1)["state"]
    assert "frozen" not in metadata.tree and "params" in metadata.tree
    restored, _, _ = Trainer(config, method, tmp_path).restore()
    for a, b in zip(jax.tree.leaves(host(restored)), jax.tree.leaves(host(result.state)), strict=True):
        np.testing.assert_array_equal(a, b)
