"""``config.frozen_dtype``: the train state keeps the frozen matrices (kernels, embedding tables) in bf16, half their
bytes, and that is exactly training with those weights rounded to bf16: the same loss and the same gradients, bit
for bit, whether the layers compute in float32 (they widen the stored weight) or in bf16 (they cast it there
anyway). The learnt rows beside a stored-bf16 table (CustomCrafter's token) are not rounded, norm scales and biases
stay float32, and a run whose checkpoints leave the frozen weights out resumes exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.config_utils import get_config
from jaxvc.methods import build_method
from jaxvc.train.cli import build_data
from jaxvc.train.loop import Trainer
from jaxvc.train.state import merge_params, tree_bytes

FAST = ["compiler_options={'xla_backend_optimization_level': 0}", "progress_bar=false", "checkpoint.use_async=false",
        "batch_size=2", "model.num_frames=2", "log_every=1"]


def trainer(tmp_path, spec, *overrides):
    config = get_config(spec, FAST + list(overrides))
    return Trainer(config, build_method(config), tmp_path / "run")


def test_frozen_matrices_are_stored_in_bf16_and_nothing_else_changes(tmp_path):
    kept = trainer(tmp_path, "configs/videomaker.py:tiny").abstract_state
    halved = trainer(tmp_path, "configs/videomaker.py:tiny", "frozen_dtype=bfloat16").abstract_state
    matrices = vectors = 0
    for full, stored in zip(jax.tree.leaves(kept.frozen), jax.tree.leaves(halved.frozen)):
        assert full.dtype == jnp.float32 and stored.shape == full.shape
        if full.ndim >= 2:
            assert stored.dtype == jnp.bfloat16
            matrices += full.size
        else:
            assert stored.dtype == jnp.float32  # norm scales and biases: norms run in float32
            vectors += full.size
    assert matrices > 50 * vectors  # the matrices are nearly all the bytes
    assert tree_bytes(halved.frozen) == tree_bytes(kept.frozen) - 2 * matrices
    # the trainable weights, their optimizer moments and the EMA are untouched
    for part in ("params", "opt_state", "ema"):
        assert jax.tree.map(lambda x: (x.shape, x.dtype), getattr(halved, part)) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), getattr(kept, part))


def test_a_name_that_is_not_a_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config.frozen_dtype = 'bf15': expected '' \(keep float32\) or one of"):
        trainer(tmp_path, "configs/videomaker.py:tiny", "frozen_dtype=bf15")


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_storing_in_bf16_is_exactly_training_with_the_rounded_weights(tmp_path, compute):
    """CustomCrafter: a frozen UNet and text encoder with LoRA and a learnt token row appended to the frozen token
    table, the case where a layer could compute in the stored dtype instead of the weight's value."""
    spec = "configs/customcrafter.py:tiny"
    full = trainer(tmp_path / "full", spec, f"compute_dtype={compute}")
    state = full.init_state()
    stored = trainer(tmp_path / "stored", spec, f"compute_dtype={compute}", "frozen_dtype=bfloat16").init_state()
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype) if x.ndim >= 2 else x, state.frozen)
    for want, got in zip(jax.tree.leaves(rounded), jax.tree.leaves(stored.frozen)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want))
    for want, got in zip(jax.tree.leaves(state.params), jax.tree.leaves(stored.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    method = full.method
    rows = full.host_rows
    batch = next(iter(build_data(full.config, rows, method.tokenizer)))
    batch = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "fiub"}
    batch["tokens"] = jnp.asarray(method.tokenizer(["a <new1> toy", "video of a <new1> toy"]))  # the learnt row
    loss_and_grads = jax.jit(jax.value_and_grad(
        lambda trainable, frozen, batch, rng: method.loss(merge_params(trainable, frozen), batch, rng)[0]))
    rng = jax.random.PRNGKey(0)
    loss_stored, grads_stored = loss_and_grads(state.params, stored.frozen, batch, rng)
    loss_rounded, grads_rounded = loss_and_grads(state.params, rounded, batch, rng)
    loss_full, _ = loss_and_grads(state.params, state.frozen, batch, rng)
    assert float(loss_stored) == float(loss_rounded)
    for want, got in zip(jax.tree.leaves(grads_rounded), jax.tree.leaves(grads_stored)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(loss_stored) != float(loss_full)  # the rounding is real: these weights are not bf16 already
    assert grads_stored["params"]["new_tokens"].dtype == jnp.float32
    assert np.any(np.asarray(grads_stored["params"]["new_tokens"]))


def test_resume_with_the_frozen_weights_left_out_of_the_checkpoints_is_exact(tmp_path):
    """``checkpoint.save_frozen=False``: on resume the frozen weights are made again (re-read, for a pretrained
    run) and stored in bf16 again; the run continues as if never stopped."""
    def run(workdir, steps):
        config = get_config("configs/videomaker.py:tiny", FAST + [
            "frozen_dtype=bfloat16", "checkpoint.save_frozen=false", "checkpoint.every=2", f"steps={steps}"])
        return Trainer(config, build_method(config), workdir).fit(lambda rows: build_data(config, rows))

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert resumed.start_step == 2
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history][2:]
    for want, got in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert {leaf.dtype for leaf in jax.tree.leaves(resumed.state.frozen)} == {jnp.dtype(jnp.bfloat16),
                                                                              jnp.dtype(jnp.float32)}
