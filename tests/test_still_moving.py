"""Still-Moving's defining mechanics (jaxvc/methods/still_moving.py), on the tiny UNet / VAE / CLIP:

* only the stage's adapter trains: the motion adapter sits on q/k/v of the temporal attentions and nowhere else, the
  spatial adapters on the spatial ResNet / transformer block outputs; fresh adapters are the identity;
* trained on frozen videos, the motion adapter makes the model's clean-sample estimate of a frozen video more still
  (lower variance over frames) and its noise error lower; removed (scale 0), the model is exactly the base model;
* generation removes the motion adapter (the paper's inference); stage "spatial" loads the motion adapter from the
  stage-"motion" run or from its exported LoRA file, keeps it frozen while the spatial adapters train;
* a customization LoRA file is merged into the frozen UNet and text encoder weights;
* the loss and its gradients on data 2 x fsdp 4 (8 simulated devices) equal one device's.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxvc.config_utils import apply_overrides
from jaxvc.diffusion.schedule import add_noise
from jaxvc.methods import build_method
from jaxvc.models import lora
from tests.multidevice import run_with_devices, sharded_loss_script
from tests.tiny_models import method_config

MOTION_STEPS = 20


def tiny_config(**overrides):
    return method_config("configs/still_moving.py:tiny", **overrides)


def train(config, workdir):
    from jaxvc.train.cli import build_data
    from jaxvc.train.loop import Trainer

    method = build_method(config)
    trainer = Trainer(config, method, workdir)
    initial = jax.device_get(trainer.init_state().full_params())
    trainer.fit(lambda rows: build_data(config, rows))
    state, _, _ = trainer.restore()
    return method, initial, jax.device_get(state.full_params())


@pytest.fixture(scope="module")
def motion_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("still_moving") / "motion"
    config = tiny_config(steps=MOTION_STEPS, batch_size=4, **{"optim.lr": "1e-3", "checkpoint.every": MOTION_STEPS})
    method, initial, trained = train(config, folder)
    return dict(folder=folder, config=config, method=method, initial=initial, trained=trained)


def frozen_batch(config, seed=123):
    from jaxvc.train.cli import build_data

    apply_overrides(config, [("data.seed", str(seed))])  # images the run did not draw in this order
    data = build_data(config, (0, 4))
    batch = next(data)
    data.close()
    return jnp.asarray(batch["video"]), jnp.asarray(batch["tokens"])


def flat_paths(tree):
    return ["/".join(p) for p in traverse_util.flatten_dict(tree)]


def test_only_the_stage_adapter_trains(motion_run):
    method = motion_run["method"]
    params = motion_run["initial"]
    trainable = [p for p in flat_paths(params) if method.trainable(tuple(p.split("/")))]
    assert trainable and all(p.startswith("params/adapters/motion/") for p in trainable)
    sites = lora.adapter_sites(params["params"]["adapters"]["motion"])
    assert len(sites) == 36  # 6 motion modules x 2 temporal attentions x q, k, v
    assert all("motion_modules_" in "/".join(s) and s[-1] in ("to_q", "to_k", "to_v") for s in sites)
    spatial = lora.find_sites(lambda: method.unet.init(jax.random.key(0), jnp.zeros((1, 4, 8, 8, 4)),
                                                       jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 32))),
                              method.spatial_spec)
    assert {s[-1].rsplit("_", 1)[0] for s in spatial} == {"resnets", "attentions"}
    assert not any("motion_modules_" in "/".join(s) for s in spatial)


def test_fresh_adapters_are_the_identity(motion_run):
    method, params = motion_run["method"], motion_run["initial"]
    noisy = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 4))
    text = jax.random.normal(jax.random.key(1), (2, 77, 32))
    t = jnp.array([10, 700])
    plain = method.unet.apply({"params": params["params"]["unet"]}, noisy, t, text)
    np.testing.assert_array_equal(np.asarray(method.denoise(params, noisy, t, text, motion_scale=1.0)),
                                  np.asarray(plain))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))  # one program per scale (eagerly: ~400 small compiles)
def _stillness(method, params, video, tokens, motion_scale, t):
    latents = jnp.repeat(method.encode_pixels(params, video[:, :1]), video.shape[1], axis=1)
    noise = jax.random.normal(jax.random.key(7), latents.shape)
    timesteps = jnp.full((latents.shape[0],), t)
    noisy = add_noise(method.schedule, latents, noise, timesteps)
    eps = method.denoise(params, noisy, timesteps, method.encode_text(params, tokens), motion_scale=motion_scale)
    alpha_bar = method.schedule.alphas_cumprod[t]
    x0 = (noisy - jnp.sqrt(1 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
    return jnp.mean(jnp.var(x0, axis=1)), jnp.mean((eps - noise) ** 2), eps


def stillness(method, params, video, tokens, motion_scale, t=300):
    """(variance over frames of the x0 estimate, noise MSE) on noisy frozen videos."""
    variance, mse, eps = _stillness(method, params, video, tokens, motion_scale, t)
    return float(variance), float(mse), np.asarray(eps)


def test_motion_adapter_learns_stills_and_is_removed_at_inference(motion_run):
    method, initial, trained = motion_run["method"], motion_run["initial"], motion_run["trained"]
    video, tokens = frozen_batch(motion_run["config"])
    base_var, base_mse, base_eps = stillness(method, initial, video, tokens, 0.0)
    on_var, on_mse, _ = stillness(method, trained, video, tokens, 1.0)
    off_var, off_mse, off_eps = stillness(method, trained, video, tokens, 0.0)
    print(f"x0 variance over frames: base {base_var:.4f}, adapter on {on_var:.4f}; noise MSE {base_mse:.3f} -> "
          f"{on_mse:.3f}")
    assert on_var < 0.95 * base_var and on_mse < 0.85 * base_mse
    np.testing.assert_array_equal(off_eps, base_eps)  # removed: exactly the base model

    # generation: the paper's inference has no motion adapter; stage "motion" validation samples keep it on
    kwargs = dict(num_frames=4, height=32, width=32, num_inference_steps=3, decode=False, seed=1)
    removed = method.pipeline(trained, None, motion_scale=0.0)
    assert removed.adapters == ()
    base = method.pipeline(initial, None, motion_scale=0.0)
    from jaxvc.models.tokenizer import load_tokenizer
    removed.tokenizer = base.tokenizer = load_tokenizer(None)
    np.testing.assert_array_equal(np.asarray(removed.generate(None, "a subject", **kwargs)),
                                  np.asarray(base.generate(None, "a subject", **kwargs)))
    with_adapter = method.pipeline(trained, load_tokenizer(None), motion_scale=1.0)
    assert not np.allclose(np.asarray(with_adapter.generate(None, "a subject", **kwargs)),
                           np.asarray(base.generate(None, "a subject", **kwargs)))
    with pytest.raises(ValueError, match="text-to-video"):
        removed.generate(jnp.zeros((1, 32, 32, 3)), "a subject", **kwargs)


def test_spatial_stage_keeps_the_motion_adapter_frozen(motion_run, tmp_path):
    from jaxvc.convert.lora import save_lora

    trained = motion_run["trained"]
    config = tiny_config(steps=4, **{"model.options.stage": "spatial",
                                     "model.options.motion_adapter": str(motion_run["folder"])})
    method, initial, after = train(config, tmp_path / "spatial")
    assert all(p.startswith("params/adapters/spatial/") for p in flat_paths(initial)
               if method.trainable(tuple(p.split("/"))))
    for name in ("initial", "after"):  # loaded from the run, and unchanged by training
        tree = {"initial": initial, "after": after}[name]
        for a, b in zip(jax.tree.leaves(tree["params"]["adapters"]["motion"]),
                        jax.tree.leaves(trained["params"]["adapters"]["motion"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    spatial_before = jax.tree.leaves(initial["params"]["adapters"]["spatial"])
    spatial_after = jax.tree.leaves(after["params"]["adapters"]["spatial"])
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(
        {k: v for k, v in traverse_util.flatten_dict(initial["params"]["adapters"]["spatial"]).items()
         if k[-1] == "up"}))  # zero-init: the identity
    assert any(not np.array_equal(a, b) for a, b in zip(spatial_before, spatial_after))

    # generation from the spatial stage: spatial adapters only
    pipe = method.pipeline(after, None)
    assert [spec for spec, _ in pipe.adapters] == [method.spatial_spec]

    # the motion adapter exported as a diffusers LoRA file loads as the same function
    motion = motion_run["method"]
    path = save_lora(tmp_path / "motion.safetensors", {"unet": lora.AppliedAdapter(
        motion.motion_spec, trained["params"]["adapters"]["motion"])})
    from_file = build_method(tiny_config(**{"model.options.stage": "spatial",
                                            "model.options.motion_adapter": str(path)}))
    video, tokens = frozen_batch(motion_run["config"])
    _, _, eps_run = stillness(method, initial, video, tokens, 1.0)
    same_base = {"params": {**initial["params"], "adapters": {
        "motion": from_file.loaded_motion_adapter.tree, "spatial": initial["params"]["adapters"]["spatial"]}}}
    _, _, eps_file = stillness(from_file, same_base, video, tokens, 1.0)
    np.testing.assert_allclose(eps_file, eps_run, rtol=1e-5, atol=1e-5)


def test_customization_lora_is_merged_into_the_frozen_weights(motion_run, tmp_path):
    from jaxvc.convert.lora import save_lora

    method, params = motion_run["method"], motion_run["initial"]
    rng = np.random.default_rng(0)

    def random_adapter(tree_params, include):
        spec = lora.AdapterSpec(include=include, rank=2, alpha=4.0)
        flat = traverse_util.flatten_dict(tree_params)
        leaves = {}
        for path, kernel in flat.items():
            if path[-1] == "kernel" and spec.matches(path[:-1]):
                leaves[path[:-1] + ("down",)] = rng.standard_normal((kernel.shape[0], 2)).astype(np.float32)
                leaves[path[:-1] + ("up",)] = rng.standard_normal((2, kernel.shape[1])).astype(np.float32)
        return lora.AppliedAdapter(spec, traverse_util.unflatten_dict(leaves))

    unet_lora = random_adapter(params["params"]["unet"], (r".*attentions_\d+/transformer_blocks_\d+/attn2/to_k",))
    text_lora = random_adapter(params["params"]["text_encoder"], (r"encoder/layers_\d+/self_attn/v_proj",))
    path = save_lora(tmp_path / "dreambooth.safetensors", {"unet": unet_lora, "text_encoder": text_lora})
    custom = build_method(tiny_config(**{"model.options.customization_lora": str(path),
                                         "model.options.customization_scale": "0.5"}))
    merged = jax.device_get(custom.init_params(jax.random.PRNGKey(0)))
    base = jax.device_get(method.init_params(jax.random.PRNGKey(0)))
    for component, adapter in (("unet", unet_lora), ("text_encoder", text_lora)):
        for site, pair in lora.adapter_sites(adapter.tree).items():
            kernel = traverse_util.flatten_dict(base["params"][component])[site + ("kernel",)]
            want = kernel + 0.5 * 2.0 * pair["down"] @ pair["up"]
            got = traverse_util.flatten_dict(merged["params"][component])[site + ("kernel",)]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_loss_and_gradients_equal_one_device():
    run_with_devices(sharded_loss_script("configs/still_moving.py:tiny", sharded_parts=("unet",)))
