"""A method's init in parts (``jaxvc.methods.base.init_program``): run eagerly, each component (UNet, text encoder,
extras) is its own compiled program, made once per method and compiler options, with the parameters of the whole
init compiled as one program; the single-device trainer builds its state that way, with the run's compiler options.
On the one-level pixel-space VideoMaker of the plan tests (cheap to compile)."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxvc import compile_options
from jaxvc.config_utils import load_config
from jaxvc.methods import build_method
from tests.plan_configs import MINI_CONFIG


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    path = tmp_path_factory.mktemp("init_parts") / "mini.py"
    path.write_text(MINI_CONFIG)
    return load_config(str(path)), build_method(load_config(str(path)))


def options_key(options):
    return repr(sorted(options.items())) if options else None


def test_parts_equal_the_whole_init_and_compile_once(mini):
    _, method = mini
    key = jax.random.key(0)
    parts = method.init_params(key)
    assert sorted(name for name, _ in method._init_programs) == ["extras", "text_encoder", "unet"]
    whole = jax.jit(method.init_params)(key)  # traced: the parts are inlined into one program
    flat_parts, flat_whole = traverse_util.flatten_dict(parts), traverse_util.flatten_dict(whole)
    assert flat_parts.keys() == flat_whole.keys() and len(flat_parts) > 50
    for path, value in flat_whole.items():
        np.testing.assert_allclose(np.asarray(flat_parts[path]), np.asarray(value), rtol=1e-6, atol=1e-7,
                                   err_msg="/".join(path))
    programs = dict(method._init_programs)
    again = method.init_params(key)  # the compiled parts are reused, not made again
    assert method._init_programs == programs
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(parts)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {key for _, key in programs} == {options_key(compile_options.merged())}  # outside a scope: the defaults


def test_single_device_trainer_builds_its_state_from_the_parts(mini, tmp_path):
    from jaxvc.train.loop import Trainer
    from jaxvc.train.state import split_params

    config, method = mini
    trainer = Trainer(config, method, tmp_path / "run")
    assert trainer.mesh.size == 1 and method.init_in_parts
    with compile_options.scope({"xla_backend_optimization_level": 0}):
        assert compile_options.current() == {"xla_backend_optimization_level": 0}
    # the run's options (here jaxvc's defaults) inside the trainer's scope: the parts compiled above serve it
    programs = dict(method._init_programs)
    state = trainer.init_state()
    assert method._init_programs == programs and {key for _, key in programs} == {
        options_key(trainer.compiler_options)}
    init_rng, _ = trainer._rngs()
    trainable, frozen = split_params(method.init_params(init_rng), method.trainable)  # parts = whole (above)
    for ours, made in ((state.params, trainable), (state.frozen, frozen)):
        assert jax.tree.structure(ours) == jax.tree.structure(made)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(made)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 0 and all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state)
                                        if np.ndim(m) > 0)
