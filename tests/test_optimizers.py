"""``optim.name``: AdamW, Adafactor, Lion and SGD. Each one's first updates against its formula (decoupled weight
decay x lr on matrices only), Adafactor's factored statistics (exact for a rank-1 gradient, a fraction of AdamW's
memory), ``mu_dtype``, clear errors, training + exact resume through the trainer with each state layout, and a WSD
cooldown branched off a longer run's checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from jaxvc.config_sections import optim
from jaxvc.config_utils import get_config
from jaxvc.methods.toy_denoiser import ToyDenoiser
from jaxvc.train import toy_data
from jaxvc.train.loop import Trainer, train
from jaxvc.train.optim import build_optimizer
from jaxvc.train.state import tree_bytes

LR, WD = 0.1, 0.5


def section(name, **fields) -> ConfigDict:
    config = optim(LR)
    config.name, config.weight_decay, config.clip_norm, config.eps = name, WD, 0.0, 0.0
    for key, value in fields.items():
        config[key] = value
    return config


def tree(rng, kernel_gradient=None):
    """A dense layer and a norm: the kernel is decayed, the bias and the scale are not."""
    kernel = rng.normal(size=(4, 3)) if kernel_gradient is None else kernel_gradient
    return {"dense": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(rng.normal(size=3), jnp.float32)},
            "norm": {"scale": jnp.asarray(rng.normal(size=3), jnp.float32)}}


def decay(params):
    return {"dense": {"kernel": WD * params["dense"]["kernel"], "bias": jnp.zeros(3)}, "norm": {"scale": jnp.zeros(3)}}


def first_update(config, params, grads):
    optimizer, _ = build_optimizer(config, total_steps=10)
    state = optimizer.init(params)
    updates, state = optimizer.update(grads, state, params)
    return updates, state, optimizer


def assert_tree_close(actual, expected, rtol=1e-6):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_first_step_is_sign_like_plus_decoupled_decay(name):
    """Step 1 of AdamW (bias-corrected, eps 0), Lion, and Adafactor on a rank-1 gradient (its factored second
    moment is then exact): -lr * (sign(g) + weight_decay * p), the decay on the kernel only."""
    rng = np.random.default_rng(0)
    params = tree(rng)
    grads = tree(rng, kernel_gradient=np.outer(rng.normal(size=4), rng.normal(size=3)))  # rank 1
    updates, _, _ = first_update(section(name, factored_min_dim=2), params, grads)
    expected = jax.tree.map(lambda g, d: -LR * (jnp.sign(g) + d), grads, decay(params))
    # (the (3,) leaves are not factored: g / sqrt(g^2) = sign(g) there too.) AdamW's bias correction divides by
    # 1 - b2 computed in float32 (0.999 is stored 1.3e-8 off: 1.3e-5 relative on 0.001, measured 1.3e-5 at most);
    # Lion takes signs and Adafactor's first step has no bias correction (measured 2e-7).
    assert_tree_close(updates, expected, rtol=2e-5 if name == "adamw" else 1e-6)


def test_sgd_momentum_and_decay():
    rng = np.random.default_rng(1)
    params, g1, g2 = tree(rng), tree(rng), tree(rng)
    updates, state, optimizer = first_update(section("sgd", b1=0.9), params, g1)
    assert_tree_close(updates, jax.tree.map(lambda g, d: -LR * (g + d), g1, decay(params)))
    updates, _ = optimizer.update(g2, state, params)
    assert_tree_close(updates, jax.tree.map(lambda a, b, d: -LR * (b + 0.9 * a + d), g1, g2, decay(params)))


def test_adafactor_factors_matrices_and_decays_with_zero_gradients():
    rng = np.random.default_rng(2)
    params = tree(rng)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state, _ = first_update(section("adafactor", factored_min_dim=2), params, zeros)
    assert_tree_close(updates, jax.tree.map(lambda d: -LR * d, decay(params)))  # only the decay moves anything
    shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(state) if np.ndim(leaf) > 0)
    assert (4,) in shapes and (3,) in shapes and (4, 3) not in shapes  # the kernel's row and column statistics


def test_mu_dtype_halves_the_first_moment():
    rng = np.random.default_rng(3)
    params = tree(rng)
    for name in ("adamw", "lion", "sgd"):
        _, state, _ = first_update(section(name, mu_dtype="bfloat16"), params, params)
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(state) if np.ndim(leaf) > 0}
        assert jnp.dtype(jnp.bfloat16) in dtypes, name
        if name == "adamw":
            assert jnp.dtype(jnp.float32) in dtypes  # the second moment stays float32


@pytest.mark.parametrize("fields, message", [
    ({"name": "adam"}, "optim.name 'adam' is not one of adamw, adafactor, lion, sgd"),
    ({"name": "adamw", "mu_dtype": "int8"}, "optim.mu_dtype 'int8'"),
    ({"name": "adafactor", "mu_dtype": "bfloat16"}, "adafactor keeps no first moment"),
    ({"name": "adafactor", "factored_min_dim": 0}, "optim.factored_min_dim must be >= 1"),
])
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(section(**fields), total_steps=10)


FAST = ["compiler_options={'xla_backend_optimization_level': 0}", "matmul_precision=highest", "model.num_blocks=1",
        "progress_bar=false", "checkpoint.every=0", "checkpoint.use_async=false"]


def test_adafactor_state_is_a_fraction_of_adamw(tmp_path):
    def state_bytes(name):
        config = get_config("configs/toy.py:tiny", FAST + [f"optim.name={name}", "optim.factored_min_dim=4"])
        return tree_bytes(Trainer(config, ToyDenoiser(config), tmp_path / name).abstract_state.opt_state)

    assert state_bytes("adafactor") < state_bytes("adamw") / 3


@pytest.mark.parametrize("name", ["adafactor", "lion", "sgd"])
def test_training_and_exact_resume_with_each_state_layout(tmp_path, name):
    def run(workdir, steps):
        config = get_config("configs/toy.py:tiny", FAST + [f"optim.name={name}", f"steps={steps}",
                                                           "optim.factored_min_dim=4"])
        return train(config, ToyDenoiser(config), lambda rows: toy_data.from_config(config, rows), workdir)

    straight = run(tmp_path / "straight", 4)
    losses = [h["loss"] for h in straight.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert resumed.start_step == 2
    assert [h["loss"] for h in resumed.history] == losses[2:]
    for a, b in zip(jax.tree.leaves(resumed.state.opt_state), jax.tree.leaves(straight.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wsd_cooldown_branched_off_a_longer_run_equals_training_it_from_the_start(tmp_path):
    """The WSD workflow of scaling studies: a long run at the stable LR is checkpointed; copying a checkpoint into a
    new run folder and resuming with a shorter ``steps`` and the matching ``cooldown_fraction`` gives exactly the
    run that had that schedule from step 0 (the stable phase does not depend on the run's length)."""
    import shutil

    def run(workdir, steps, fraction, every):
        config = get_config("configs/toy.py:tiny", FAST + [
            f"steps={steps}", "optim.schedule=wsd", "optim.warmup_steps=2", f"optim.cooldown_fraction={fraction}",
            f"checkpoint.every={every}", "checkpoint.keep=4"])
        return train(config, ToyDenoiser(config), lambda rows: toy_data.from_config(config, rows), workdir)

    long = run(tmp_path / "long", 16, 0.25, every=6)  # stable until step 12; checkpoints at 6 and 12
    (tmp_path / "branch" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "long" / "checkpoints" / "6", tmp_path / "branch" / "checkpoints" / "6")
    branch = run(tmp_path / "branch", 9, 3 / 9, every=0)  # cooldown over steps 6-9
    straight = run(tmp_path / "straight", 9, 3 / 9, every=0)
    assert branch.start_step == 6
    stable = [h["learning_rate"] for h in long.history[6:9]]
    cooling = [h["learning_rate"] for h in branch.history]
    np.testing.assert_allclose(stable, 1e-3, rtol=1e-6)  # the long run is still at the stable LR there
    assert cooling[2] < cooling[1] < 0.999e-3  # the branch cools down (its first step is the last at full LR)
    assert [h["learning_rate"] for h in branch.history] == [h["learning_rate"] for h in straight.history[6:]]
    assert [h["loss"] for h in branch.history] == [h["loss"] for h in straight.history[6:]]
    for a, b in zip(jax.tree.leaves(branch.state.params), jax.tree.leaves(straight.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
