"""MicroCinema's defining mechanics (jaxvc/methods/microcinema.py), on the tiny UNet / VAE / CLIP:

* AppearNet is a copy of the UNet's encoder and mid block (same weights at the start, no decoder); its embeddings
  reach every ResNet (FiLM at norm2) and spatial transformer (added) of the main UNet's encoder, mid block and
  decoder, the decoder's mirrored as the skip connections are; fresh zero convs leave the main UNet exactly as it is;
* the injection is h * (1 + gamma) + beta at a ResNet's norm2 and out + e at a transformer's output;
* the appearance noise prior: training noise = eps_n + lambda z^c, sampling z_T = eps_n + gamma z^c;
* training (with remat) updates AppearNet, the zero convs and the motion modules only, after which the center frame
  changes the prediction, and the run generates from its center frame (in bf16 with the UNet's and AppearNet's
  matrices stored in bf16: the same videos); remat changes no loss or gradient;
* the loss and its gradients on 8 simulated devices (data x fsdp) equal one device's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from jaxvc.methods import build_method
from jaxvc.methods.microcinema import injection_plan
from jaxvc.models.unet import unet_config
from tests.multidevice import run_with_devices, sharded_loss_script
from tests.tiny_models import method_config

TRAIN_STEPS = 12


def tiny_config(**overrides):
    return method_config("configs/microcinema.py:tiny", **overrides)


@pytest.fixture(scope="module")
def method():
    return build_method(tiny_config())


@pytest.fixture(scope="module")
def fresh(method):
    return method.init_params(jax.random.key(0))


def random_inputs(method, params, seed=0):
    rng = np.random.default_rng(seed)
    size, channels = method.latent_frame_size, method.latent_channels
    x = jnp.asarray(rng.standard_normal((2, method.num_frames, *size, channels)), jnp.float32)
    center = jnp.asarray(rng.standard_normal((2, 1, *size, channels)), jnp.float32)
    text = method.encode_text(params, jnp.broadcast_to(method.empty_prompt_tokens, (2, 77)))
    return x, jnp.array([10, 700]), text, center


def test_plan_reaches_every_resnet_and_transformer_mirrored_in_the_decoder():
    plan = injection_plan(unet_config("sd15", "v3"))
    kinds = {"film": [s for s in plan if s[-1] == "norm2"], "add": [s for s in plan if s[-1] != "norm2"]}
    # resnets: 4 levels x 2 down + 2 mid + 4 levels x 3 up; transformers: 3 x 2 down + 1 mid + 3 x 3 up
    assert (len(kinds["film"]), len(kinds["add"])) == (8 + 2 + 12, 6 + 1 + 9)
    assert plan[("up_blocks_0", "resnets_0", "norm2")] == ("down_blocks_3", "resnets_1")
    assert plan[("up_blocks_0", "resnets_2", "norm2")] == ("down_blocks_3", "resnets_0")
    assert plan[("up_blocks_1", "attentions_0")] == ("down_blocks_2", "attentions_1")
    assert plan[("mid_block", "attentions_0")] == ("mid_block", "attentions_0")
    assert all(not s[0].startswith("up_blocks") for s in injection_plan(unet_config("sd15", "v3"), False))


def test_fresh_model_is_the_main_unet_and_appearnet_its_encoder(method, fresh):
    tree = fresh["params"]
    assert sorted(tree["appearnet"]) == ["conv_in", "down_blocks_0", "down_blocks_1", "mid_block", "time_embedding"]
    for key, value in tree["appearnet"].items():
        assert jax.tree.all(jax.tree.map(np.array_equal, value, tree["unet"][key]))
    x, t, text, center = random_inputs(method, fresh)
    plain = method.unet.apply({"params": tree["unet"]}, x, t, text)
    np.testing.assert_array_equal(np.asarray(method.denoise(fresh, x, t, text, center)), np.asarray(plain))


def _with_site(params, site, bias):
    """The injection parameters with every zero conv at zero except ``site``'s bias (a constant injection)."""
    injection = jax.tree.map(jnp.zeros_like, params["params"]["injection"])
    flat = traverse_util.flatten_dict(injection["sites"])
    flat[site + ("bias",)] = jnp.asarray(bias, jnp.float32)
    return {"params": {**params["params"], "injection": {**injection, "sites": traverse_util.unflatten_dict(flat)}}}


@pytest.mark.parametrize("site", [("mid_block", "resnets_0", "norm2"), ("up_blocks_1", "attentions_0")])
def test_injection_formula(method, fresh, site):
    """A constant embedding projection at one site: norm2 -> norm2 * (1 + gamma) + beta; transformer -> out + e."""
    width = traverse_util.flatten_dict(fresh["params"]["injection"]["sites"])[site + ("bias",)].shape[0]
    rng = np.random.default_rng(1)
    bias = rng.uniform(-0.5, 0.5, width).astype(np.float32)
    params = _with_site(fresh, site, bias)
    x, t, text, center = random_inputs(method, fresh)

    def recorded(run):
        seen = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path == site:
                seen["out"] = out
            return out
        with nn.intercept_methods(record):  # registered first: sees what the injection returns
            run()
        return np.asarray(seen["out"])

    plain = recorded(lambda: method.unet.apply({"params": fresh["params"]["unet"]}, x, t, text))
    embeddings = method.appearance(params, x, t, text, center)

    def injected():
        with method.injected(params, embeddings):
            method.unet.apply({"params": fresh["params"]["unet"]}, x, t, text)

    if site[-1] == "norm2":
        gamma, beta = np.split(bias, 2)
        expected = plain * (1 + gamma) + beta
    else:
        expected = plain + bias
    # only this site injects, so what comes before it runs as in the plain UNet
    np.testing.assert_allclose(recorded(injected), expected, rtol=1e-6, atol=1e-6)


def test_appearance_noise_prior(method, fresh):
    shape = (2, method.num_frames, *method.latent_frame_size, method.latent_channels)
    center = jax.random.normal(jax.random.key(3), (2, 1, *shape[2:]))
    noise = method.training_noise(jax.random.key(4), shape, center)
    eps_n = jax.random.normal(jax.random.key(4), shape)
    np.testing.assert_allclose(np.asarray(noise - eps_n), np.asarray(jnp.broadcast_to(0.03 * center, shape)),
                               atol=1e-6)
    pipe = method.pipeline(fresh, None)
    x_T = pipe.conditioning.initial_latents(eps_n[:1], center[:1])
    np.testing.assert_allclose(np.asarray(x_T - eps_n[:1]), np.asarray(jnp.broadcast_to(0.02 * center[:1],
                                                                                         (1, *shape[1:]))), atol=1e-6)


def test_training_updates_the_appearance_path_and_generates(tmp_path):
    from jaxvc.pipeline import CustomVideoPipeline
    from jaxvc.train.cli import build_data
    from jaxvc.train.loop import Trainer

    config = tiny_config(steps=TRAIN_STEPS, batch_size=4, remat_policy="full",
                         **{"optim.lr": "1e-3", "checkpoint.every": TRAIN_STEPS, "model.options.drop_both_prob": 0.3})
    method = build_method(config)
    trainer = Trainer(config, method, tmp_path / "run")
    initial = jax.device_get(trainer.init_state().full_params())
    trainer.fit(lambda rows: build_data(config, rows))
    state, _, _ = trainer.restore()
    trained = jax.device_get(state.full_params())

    changed = {"/".join(k) for k, v in traverse_util.flatten_dict(trained).items()
               if not np.array_equal(v, traverse_util.flatten_dict(initial)[k])}
    assert changed and all(p.split("/")[1] in ("appearnet", "injection") or "motion_modules_" in p for p in changed)
    assert any("/injection/sites/up_blocks_" in p for p in changed) and any("/appearnet/" in p for p in changed)

    # the center frame now changes the prediction (a fresh model ignores it: test_fresh_model_is_the_main_unet),
    # measured by `python -m jaxvc.eval.condition_gain RUN` on held-out clips
    from jaxvc.eval.condition_gain import condition_gain
    from jaxvc.train.trained_run import load_trained_run

    [(_, _, with_center, without, change)] = condition_gain(load_trained_run(tmp_path / "run"), clips=4, seeds=1,
                                                            bands=1)
    print(f"held-out noise error {with_center:.5f} with the center frame, {without:.5f} with zeros; the center "
          f"frame moves the prediction by {change:.2e}")
    assert np.isfinite([with_center, without]).all() and change > 1e-4

    pipe = CustomVideoPipeline.from_run(tmp_path / "run")
    assert pipe.takes_reference and not pipe.reference_frame
    reference = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
    kwargs = dict(num_inference_steps=3, num_frames=method.num_frames, height=32, width=32, seed=0)
    video = np.asarray(pipe.generate(reference, "a subject", **kwargs))
    assert video.shape == (1, method.num_frames, 32, 32, 3) and np.isfinite(video).all()
    assert not np.allclose(video, np.asarray(pipe.generate(None, "a subject", **kwargs)))

    # generation in bf16 (`jaxvc generate --dtype bfloat16`) keeps the UNet's and AppearNet's matrices in bf16 and
    # gives the videos of their float32 weights in the same bf16 model
    stored = CustomVideoPipeline.from_run(tmp_path / "run", dtype="bfloat16")
    kernels = lambda tree: {leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
                            if path[-1].key == "kernel"}
    assert kernels(stored.params["conditioning"]["appearnet"]) == {jnp.dtype(jnp.bfloat16)}
    assert kernels(stored.params["unet"]["params"]) == {jnp.dtype(jnp.bfloat16)}
    bf16_run = load_trained_run(tmp_path / "run", overrides={"compute_dtype": "bfloat16"})
    float32_weights = bf16_run.method.pipeline(bf16_run.params, bf16_run.method.tokenizer)
    assert kernels(float32_weights.params["conditioning"]["appearnet"]) == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(np.asarray(stored.generate(reference, "a subject", **kwargs)),
                                  np.asarray(float32_weights.generate(reference, "a subject", **kwargs)))


def test_remat_changes_nothing(method, fresh):
    """AppearNet's embeddings leave jax.checkpoint through a collection, the injection enters it by closure: the
    loss and its gradients are those without remat."""
    rematted = build_method(tiny_config(remat_policy="full"))
    params = {"params": {**fresh["params"], "injection": jax.tree.map(
        lambda v: 0.05 * jax.random.normal(jax.random.key(v.size), v.shape), fresh["params"]["injection"])}}
    x, t, text, center = random_inputs(method, fresh)

    def loss(model, params):
        return jnp.mean(jnp.square(model.denoise(params, x, t, text, center)))

    results = [jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params) for m in (method, rematted)]
    (value, grads), (value_remat, grads_remat) = results
    np.testing.assert_allclose(float(value_remat), float(value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat["params"]["appearnet"]), jax.tree.leaves(grads["params"]["appearnet"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_sharded_loss_and_gradients_equal_one_device():
    """data 2 x fsdp 4 on 8 simulated devices: AppearNet, the zero convs and the UNet sharded by the rule table."""
    run_with_devices(sharded_loss_script("configs/microcinema.py:tiny", perturb=("injection",),
                                         sharded_parts=("appearnet", "injection")))
