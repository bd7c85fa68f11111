"""Config files, command-line overrides, the `jaxvc train` argument parsing, LR schedules, the weight-decay mask and
the optimizer's footprint (no optimizer state for frozen parameters). Nothing here compiles an XLA program."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.config_utils import (ConfigError, get_config, load_config, split_override_args,
                                write_config)
from jaxvc.methods import METHODS, build_method
from jaxvc.train import cli as train_cli
from jaxvc.train.optim import build_schedule, decay_mask
from jaxvc.train.state import unbox


def test_load_variants_and_errors(tmp_path):
    assert load_config("configs/toy.py").mesh.data == -1
    fsdp = load_config("configs/toy.py:fsdp_tensor")
    assert (fsdp.mesh.fsdp, fsdp.mesh.tensor) == (-1, 2)
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        load_config("configs/toy.py:nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/missing.py:tiny")
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(str(bad))


def test_overrides_parse_to_the_field_type():
    config = get_config("configs/toy.py:tiny", [
        "optim.lr=1", "steps=2e3", "checkpoint.use_async=false", "optim.ema_decay=0.99",
        "model.trainable=('params/.*',)", "rules=(('embed', None),)", "optim.schedule=constant",
        "compiler_options={'xla_backend_optimization_level': 0}", "matmul_precision=highest",
        "optim.decay_steps=7"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.steps == 2000 and isinstance(config.steps, int)
    assert config.checkpoint.use_async is False
    assert config.optim.ema_decay == 0.99  # a None placeholder typed float
    assert tuple(config.model.trainable) == ("params/.*",)
    assert tuple(config.rules) == (("embed", None),)
    assert config.optim.schedule == "constant"
    assert config.compiler_options.xla_backend_optimization_level == 0
    assert config.matmul_precision == "highest" and config.optim.decay_steps == 7


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "'optim.lrr' is not a key of optim.*did you mean lr"),
    ("stepz=1", "'stepz' is not a key of config.*did you mean steps"),
    ("steps=1.5", "expected int"),
    ("optim.lr=fast", "expected float"),
    ("optim.ema_decay=fast", "expected float"),
    ("checkpoint.use_async=maybe", "expected bool"),
    ("optim=3", "group of settings"),
    ("optim.lr.x=1", "'optim.lr' is a float, not a group"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        get_config("configs/toy.py:tiny", [override])


def test_split_override_args_both_forms():
    overrides, rest = split_override_args(["--config", "c.py:x", "--config.optim.lr=1e-4", "--config.steps", "7",
                                           "--workdir", "w"])
    assert overrides == [("optim.lr", "1e-4"), ("steps", "7")]
    assert rest == ["--config", "c.py:x", "--workdir", "w"]
    with pytest.raises(ConfigError, match="has no value"):
        split_override_args(["--config.steps"])


def _parse(argv):
    parser = argparse.ArgumentParser(prog="jaxvc train")
    train_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_parses_overrides_and_rejects_unknown_keys(tmp_path, capsys):
    args = _parse(["--config", "configs/toy.py:fsdp", "--config.optim.lr=1e-4", "--config.steps", "7",
                   "--workdir", str(tmp_path)])
    assert args.config == "configs/toy.py:fsdp" and args.workdir == str(tmp_path)
    assert args.config_overrides == [("optim.lr", "1e-4"), ("steps", "7")]
    assert args.distributed == "env"
    bad = _parse(["--config", "configs/toy.py", "--config.optim.betas=1", "--workdir", str(tmp_path)])
    assert train_cli.run(bad) == 2
    assert "'optim.betas' is not a key of optim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--config", "configs/toy.py", "--not-a-flag"])


def test_write_config_round_trips(tmp_path):
    config = get_config("configs/toy.py:tiny", ["optim.lr=0.5"])
    path = write_config(config, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["optim"]["lr"] == 0.5 and saved["method"] == "toy"


def test_registry_and_data_sources():
    assert "toy" in METHODS
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        build_method(get_config("configs/toy.py", ["method=nope"]))
    config = get_config("configs/toy.py", ["data.source=nope"])
    with pytest.raises(ConfigError, match="config.data.source 'nope'"):
        train_cli.build_data(config, (0, 8))


def test_videomaker_attention_backend_reaches_the_unet_only():
    """config.model.attention_backend picks the UNet's attention (cudnn for GPU training); the VAE and text encoder
    keep the einsum path, as in the benchmark."""
    method = build_method(get_config("configs/videomaker.py:tiny", ["model.attention_backend=jax"]))
    assert method.unet.config.attention_backend == "jax"
    assert method.text_encoder.config.attention_backend == "xla"
    with pytest.raises(ValueError, match="config.model.attention_backend = 'flash': expected one of xla, jax"):
        build_method(get_config("configs/videomaker.py:tiny", ["model.attention_backend=flash"]))


def test_schedules():
    optim = get_config("configs/toy.py").optim
    optim.lr, optim.warmup_steps, optim.end_lr_ratio = 1.0, 4, 0.1
    cosine = build_schedule(optim, total_steps=14)
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 2, 4, 9, 14)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6)
    optim.schedule = "warmup_constant"
    const = build_schedule(optim, total_steps=14)
    np.testing.assert_allclose([float(const(s)) for s in (0, 2, 4, 100)], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    optim.schedule = "constant"
    assert float(build_schedule(optim, 14)(0)) == 1.0
    optim.schedule = "linear"
    with pytest.raises(ValueError, match="optim.schedule 'linear'"):
        build_schedule(optim, 14)


def test_linear_wsd_and_rsqrt_schedules():
    optim = get_config("configs/toy.py").optim
    optim.lr, optim.warmup_steps, optim.end_lr_ratio = 1.0, 4, 0.1
    optim.schedule = "warmup_linear"
    linear = build_schedule(optim, total_steps=14)
    np.testing.assert_allclose([float(linear(s)) for s in (0, 2, 4, 9, 14, 20)],
                               [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    # wsd over 24 steps: warmup to step 4, lr held until step 19, the cooldown on the last 5 (0.2 x 24 -> 5)
    optim.schedule, optim.cooldown_fraction = "wsd", 0.2
    expected_x = {19: 0.0, 20: 0.2, 22: 0.6, 24: 1.0, 30: 1.0}
    for shape, curve in (("1-sqrt", lambda x: 1 - np.sqrt(x)), ("linear", lambda x: 1 - x),
                         ("cosine", lambda x: 0.5 * (1 + np.cos(np.pi * x)))):
        optim.cooldown_shape = shape
        wsd = build_schedule(optim, total_steps=24)
        np.testing.assert_allclose([float(wsd(s)) for s in (0, 2, 4, 12)], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
        np.testing.assert_allclose([float(wsd(s)) for s in expected_x],
                                   [0.1 + 0.9 * curve(x) for x in expected_x.values()], atol=1e-6, err_msg=shape)
    # jitted, as the optimizer runs it
    np.testing.assert_allclose(float(jax.jit(wsd)(jnp.int32(22))), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.6)),
                               atol=1e-6)
    optim.schedule = "rsqrt"
    rsqrt = build_schedule(optim, total_steps=24)
    np.testing.assert_allclose([float(rsqrt(s)) for s in (0, 2, 4, 16, 100)], [0.0, 0.5, 1.0, 0.5, 0.2], atol=1e-6)
    optim.warmup_steps = 0
    np.testing.assert_allclose([float(build_schedule(optim, 24)(s)) for s in (0, 1, 4)], [1.0, 1.0, 0.5], atol=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"schedule": "wsd", "cooldown_fraction": 0.0}, "optim.cooldown_fraction 0.0 of 14 decay steps"),
    ({"schedule": "wsd", "cooldown_fraction": 0.9}, "leave the 4 warmup steps"),
    ({"schedule": "wsd", "cooldown_shape": "exp"}, "optim.cooldown_shape 'exp' is not one of 1-sqrt, linear, cosine"),
    ({"schedule": "warmup_linear", "decay_steps": 3}, "optim.decay_steps .3. must exceed optim.warmup_steps .4."),
    ({"schedule": "rsqrt", "warmup_steps": -1}, "optim.warmup_steps must be >= 0"),
])
def test_schedule_errors_name_the_field(fields, message):
    optim = get_config("configs/toy.py").optim
    optim.lr, optim.warmup_steps = 1.0, 4
    for key, value in fields.items():
        optim[key] = value
    with pytest.raises(ValueError, match=message):
        build_schedule(optim, total_steps=14)


def test_decay_mask_skips_norms_and_biases():
    method = build_method(get_config("configs/toy.py"))
    params = unbox(method.abstract_params())
    mask = decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    decided = {"/".join(str(k.key) for k in path): value for path, value in flat}
    assert decided["params/blocks_0/conv1/kernel"] and decided["params/conv_out/kernel"]
    assert decided["params/blocks_0/time_emb_proj/kernel"]
    assert not decided["params/blocks_0/conv1/bias"]
    assert not decided["params/blocks_0/norm1/scale"] and not decided["params/norm_out/bias"]


def test_frozen_parameters_get_no_optimizer_state(tmp_path):
    from jaxvc.train.loop import Trainer

    config = get_config("configs/toy.py")
    method = build_method(config)
    trainer = Trainer(config, method, tmp_path)
    state = trainer.abstract_state  # shapes only: what init would allocate
    trainable_paths = {"/".join(str(k.key) for k in p) for p, _ in
                       jax.tree_util.tree_flatten_with_path(state.params)[0]}
    frozen_paths = {"/".join(str(k.key) for k in p) for p, _ in
                    jax.tree_util.tree_flatten_with_path(state.frozen)[0]}
    assert frozen_paths == {"params/conv_in/kernel", "params/conv_in/bias", "params/time_embedding/linear_1/kernel",
                            "params/time_embedding/linear_1/bias", "params/time_embedding/linear_2/kernel",
                            "params/time_embedding/linear_2/bias"}
    assert not trainable_paths & frozen_paths
    opt_leaves = jax.tree.leaves(state.opt_state)
    opt_paths = ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    for frozen in frozen_paths:
        assert not any(p.endswith(frozen) for p in opt_paths), frozen
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    # Adam: two moments per trainable element, plus step counters; nothing for the frozen weights.
    assert sum(x.size for x in opt_leaves) - 2 * n_trainable < 8
