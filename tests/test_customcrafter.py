"""CustomCrafter's defining mechanics (jaxvc/methods/customcrafter.py), on the tiny UNet / VAE / CLIP:

* the SSLM is LoRA on q/k/v of the spatial self- and cross-attention only (rank 4, N(0, 1/r^2) down, zero up), and
  it and the placeholder's embedding row are all that train;
* the placeholder ``<new1>`` is one new token whose row starts as the class word's (so "a <new1> toy" encodes as
  "a toy toy" at first), and the text encoder's own table gets no gradient;
* Custom Diffusion's trick: no gradient reaches the start token's cross-attention key / value, LoRA included;
* DWV: the LoRA scale is 0.4 before step K and 0.8 from it (a schedule that never switches equals a fixed 0.4, one
  that switches at 0 a fixed 0.8);
* the loss is the masked mean (L2, or L1) over the subject's mask pooled to the latent grid;
* a few steps on one subject's images lower the denoising loss on them and move the new row.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from jaxvc.methods import build_method
from jaxvc.methods.customcrafter import dwv_lora_scale
from jaxvc.models import lora
from tests.tiny_models import method_config


def tiny_config(**overrides):
    return method_config("configs/customcrafter.py:tiny", **overrides)


@pytest.fixture(scope="module")
def subject_folder(tmp_path_factory):
    """Six views of one synthetic subject, each with the caption "a <new1> toy" and its mask."""
    from jaxvc.data.synthetic import SyntheticWorld

    folder = tmp_path_factory.mktemp("subject")
    world = SyntheticWorld(image_size=32, num_frames=4, num_subjects=4, held_out=0, seed=0)
    for seed in range(3):
        images, masks, _, _ = world.image_pair(1, seed=seed)
        for view in range(2):
            stem = folder / f"view{seed}{view}"
            Image.fromarray(images[view]).save(f"{stem}.png")
            Image.fromarray(masks[view].astype(np.uint8) * 255).save(f"{stem}.mask.png")
            (folder / f"view{seed}{view}.txt").write_text("a <new1> toy")
    return folder


@pytest.fixture(scope="module")
def method():
    return build_method(tiny_config())


@pytest.fixture(scope="module")
def fresh(method):
    return jax.device_get(method.init_params(jax.random.key(0)))


@pytest.fixture(scope="module")
def params(fresh):
    # a LoRA that does something (a fresh one is the identity)
    adapters = jax.tree.map(lambda x: 0.2 * np.asarray(jax.random.normal(jax.random.key(5), x.shape)),
                            fresh["params"]["adapters"])
    return {"params": {**fresh["params"], "adapters": adapters}}


def test_sslm_sites_and_what_trains(method, fresh):
    sites = lora.adapter_sites(fresh["params"]["adapters"]["sslm"])
    assert len(sites) == 24  # 4 spatial transformer blocks x attn1, attn2 x q, k, v
    assert all(s[-2] in ("attn1", "attn2") and s[-1] in ("to_q", "to_k", "to_v") and
               not any(p.startswith("motion_modules_") for p in s) for s in sites)
    downs = np.concatenate([np.ravel(pair["down"]) for pair in sites.values()])
    assert abs(downs.std() - 1 / 4) < 0.03 and not any(np.any(pair["up"]) for pair in sites.values())
    trainable = ["/".join(p) for p in traverse_util.flatten_dict(fresh)
                 if method.trainable(tuple(p))]
    assert "params/new_tokens" in trainable
    assert all(p == "params/new_tokens" or p.startswith("params/adapters/sslm/") for p in trainable)


def test_placeholder_token_starts_as_the_class_word(method, params):
    tokens = method.tokenizer(["a <new1> toy", "a toy toy"])
    assert tokens[0, 2] == method.base_vocab_size  # one new id, right after the vocabulary
    encoded = method.encode_text(params, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(encoded[0]), np.asarray(encoded[1]), rtol=1e-5, atol=1e-6)

    def loss(tree):
        return jnp.sum(method.encode_text(tree, jnp.asarray(tokens[:1])) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["params"]["new_tokens"]).sum()) > 0
    assert not np.any(np.asarray(grads["params"]["text_encoder"]["embeddings"]["token_embedding"]["embedding"]))


def test_start_token_key_value_carry_no_gradient(method, params):
    noisy = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 4))
    text = jax.random.normal(jax.random.key(1), (2, 77, 32))
    t = jnp.array([10, 700])

    def start_token_gradient(detach):
        m = dataclasses.replace(method.options, detach_start_token=detach)
        object.__setattr__(method, "options", m)
        try:
            grad = jax.jit(jax.grad(lambda c: jnp.sum(method.denoise(params, noisy, t, c) ** 2)))(text)
        finally:
            object.__setattr__(method, "options", dataclasses.replace(m, detach_start_token=True))
        return np.abs(np.asarray(grad[:, 0])).sum(), np.abs(np.asarray(grad[:, 1:])).sum()

    detached, others = start_token_gradient(True)
    plain, _ = start_token_gradient(False)
    assert detached == 0.0 and others > 0 and plain > 0


def test_dwv_switches_the_lora_scale(method, params):
    scale = dwv_lora_scale(method.options)
    assert [float(scale(i)) for i in (0, 4, 5, 49)] == [pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.8),
                                                      pytest.approx(0.8)]
    kwargs = dict(num_frames=4, height=32, width=32, num_inference_steps=4, decode=False, seed=2,
                  guidance_scale=12.0)

    def generate(options=None, lora_scale=None):
        if options is not None:
            object.__setattr__(method, "options", options)
        try:
            return np.asarray(method.pipeline(params, lora_scale=lora_scale).generate(None, "a <new1> toy", **kwargs))
        finally:
            object.__setattr__(method, "options", dataclasses.replace(method.options, switch_step=5))

    never = generate(dataclasses.replace(method.options, switch_step=99))
    at_once = generate(dataclasses.replace(method.options, switch_step=0))
    np.testing.assert_array_equal(never, generate(lora_scale=0.4))
    np.testing.assert_array_equal(at_once, generate(lora_scale=0.8))
    switched = generate(dataclasses.replace(method.options, switch_step=2))
    assert not np.allclose(switched, never) and not np.allclose(switched, at_once)


def test_loss_is_the_masked_mean(method, params):
    rng = np.random.default_rng(0)
    batch = {"video": jnp.asarray(rng.uniform(-1, 1, (2, 4, 32, 32, 3)), jnp.float32),
             "tokens": jnp.asarray(method.tokenizer(["a <new1> toy"] * 2))}
    mask = np.zeros((2, 4, 32, 32), np.float32)
    mask[:, :, :16, :16] = 1.0  # the top-left latent quarter
    pooled = method.latent_mask({"mask": jnp.asarray(mask)}, (2, 4, 8, 8, 4))
    assert pooled.shape == (2, 4, 8, 8, 1) and float(pooled.sum()) == 2 * 4 * 16

    key = jax.random.key(3)
    loss = jax.jit(method.loss)
    full, _ = loss(params, batch, key)
    masked, metrics = loss(params, {**batch, "mask": jnp.asarray(mask), "has_mask": jnp.array([True, True])}, key)
    unmasked_flag, _ = loss(params, {**batch, "mask": jnp.asarray(mask), "has_mask": jnp.array([False, False])}, key)
    assert float(metrics["mask_fraction"]) == pytest.approx(0.25)
    assert float(metrics["placeholder_in_caption"]) == 1.0  # both captions train the token's row
    _, mixed = loss(params, {**batch, "tokens": jnp.asarray(method.tokenizer(["a <new1> toy", "a toy"]))}, key)
    assert float(mixed["placeholder_in_caption"]) == 0.5  # e.g. an instance and a class image
    np.testing.assert_allclose(float(unmasked_flag), float(full), rtol=1e-6)
    assert abs(float(masked) - float(full)) > 1e-4
    object.__setattr__(method, "options", dataclasses.replace(method.options, loss_type="l1"))
    try:
        l1, _ = jax.jit(lambda *args: method.loss(*args))(params, batch, key)  # a new trace: options changed
    finally:
        object.__setattr__(method, "options", dataclasses.replace(method.options, loss_type="l2"))
    assert abs(float(l1) - float(full)) > 1e-3


def test_training_on_the_subject_learns_its_token(subject_folder, tmp_path):
    """30 steps on one subject's images lower the denoising loss on them and move the new row."""
    from jaxvc.train.cli import build_data
    from jaxvc.train.loop import Trainer

    config = tiny_config(steps=30, **{"data.streams.instance": f"folder:{subject_folder}", "checkpoint.every": 30})
    method = build_method(config)
    trainer = Trainer(config, method, tmp_path / "run")
    initial = jax.device_get(trainer.init_state().full_params())
    trainer.fit(lambda rows: build_data(config, rows, method.tokenizer))
    trained = jax.device_get(trainer.restore()[0].full_params())
    data = build_data(config, (0, 2), method.tokenizer)
    batch = next(data)
    data.close()
    assert (np.asarray(batch["tokens"]) == method.base_vocab_size).sum() == 2  # "<new1>" once in each caption
    batch = {k: jnp.asarray(batch[k]) for k in ("video", "tokens", "mask", "has_mask")}
    loss = jax.jit(method.loss)
    losses = {name: np.mean([float(loss(p, batch, jax.random.key(i))[0]) for i in range(8)])
              for name, p in (("initial", initial), ("trained", trained))}
    print(f"denoising loss on the subject: {losses['initial']:.4f} -> {losses['trained']:.4f}")
    assert losses["trained"] < 0.95 * losses["initial"]
    assert not np.allclose(trained["params"]["new_tokens"], initial["params"]["new_tokens"])


def test_exported_run_loads_in_diffusers(subject_folder, tmp_path):
    """CustomCrafter from a diffusers AnimateDiff folder, 2 steps, exported with ``jaxvc export-lora`` and loaded by
    diffusers (``load_lora_weights`` + ``load_textual_inversion``): the same text features and UNet output."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from jaxvc.convert.export_lora import export
    from jaxvc.train.cli import build_data
    from jaxvc.train.loop import Trainer
    from jaxvc.train.trained_run import load_trained_run
    from tests.conftest import relative_error
    from tests.tiny_models import build_tiny_animatediff_folder

    folder = build_tiny_animatediff_folder(tmp_path)
    config = tiny_config(steps=2, **{"model.pretrained": str(folder), "checkpoint.every": 2, "optim.lr": "0.05",
                                     "data.streams.instance": f"folder:{subject_folder}"})
    method = build_method(config)
    Trainer(config, method, tmp_path / "run").fit(lambda rows: build_data(config, rows, method.tokenizer))
    run = load_trained_run(tmp_path / "run")
    trained = run.params

    written = export(run, tmp_path / "export")
    pipe = diffusers.AnimateDiffPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(tmp_path / "export"))
    pipe.load_textual_inversion(str(written["tokens"]), token="<new1>")
    prompt = ["a <new1> toy"]
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids.numpy(), run.method.tokenizer(prompt))
    with torch.no_grad():
        torch_text = pipe.text_encoder(ids)[0]
    ours_text = run.method.encode_text(trained, jnp.asarray(ids.numpy()))
    assert relative_error(ours_text, torch_text.numpy()) < 1e-5

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 4, 8, 8, generator=generator)  # (B, C, F, H, W)
    with torch.no_grad():
        reference = pipe.unet(sample, torch.tensor([500]), torch_text.repeat_interleave(4, dim=0)).sample.numpy()

    @functools.partial(jax.jit, static_argnums=0)  # one program per scale (eagerly: ~400 small compiles)
    def ours(scale, params, latents, text):
        return run.method.denoise(params, latents, jnp.asarray([500]), text, lora_scale=scale).transpose(0, 4, 1, 2, 3)

    latents = jnp.asarray(sample.numpy().transpose(0, 2, 3, 4, 1))
    error, without = (relative_error(ours(scale, trained, latents, ours_text), reference) for scale in (1.0, 0.0))
    print(f"exported CustomCrafter in diffusers: relative error {error:.2e} (without the LoRA {without:.2e})")
    assert without > 1e-4 and error < 1e-5


def test_a_run_generates_its_validation_frames_not_its_training_clips(params):
    """CustomCrafter trains on 4-frame still clips but samples 16-frame videos (``config.validation.num_frames``,
    16 in the sd15 config): the validation samples and `jaxvc generate`'s default video have those frames."""
    from jaxvc.config_utils import ConfigError

    method = build_method(tiny_config(**{"validation.num_frames": 6, "validation.prompts": "('a <new1> toy',)",
                                         "validation.steps": 1}))
    assert method.num_frames == 4 and method.sample_frames == 6
    assert method.pipeline(params).default_video == (6, 32, 32)
    assert method.sample(params, None)["validation"].shape == (1, 6, 32, 32, 3)
    assert build_method(tiny_config()).pipeline(params).default_video == (4, 32, 32)  # unset: the training clips
    assert method_config("configs/customcrafter.py:sd15").validation.num_frames == 16
    with pytest.raises(ConfigError, match="validation.num_frames = 0: a positive number"):
        build_method(tiny_config(**{"validation.num_frames": 0}))
    with pytest.raises(ConfigError, match="validation.num_frames = 6: "):  # the Wan VAE codes 1 + 4k frames
        build_method(method_config("configs/disentangled_s2v.py:tiny", **{"validation.num_frames": 6}))
