"""The disentangled identity/motion S2V method's defining mechanics (jaxvc/methods/disentangled_s2v.py) on the tiny
Wan DiT, CLIP text encoder and VAE:

* LoRA sits on q/k/v/out of both attentions of every block, the patch embedding, the text projection and
  ffn.net.2; only it and the reference's time LoRA train; fresh, they leave the base DiT as it is;
* "<cls> " is prefixed at the token level exactly as the pipeline's text prefix tokenizes;
* reference-token dropping: whole streams at rate p ("full"), or single tokens ("subset"); a dropped stream is the
  plain text-to-video model; the reference's time LoRA reaches the video only through the reference's tokens;
* stochastic task switching trains on image-pair batches (1-frame targets) and video batches (one compiled step
  each); the run generates with the subject's reference, text-only guidance (the reference in both halves).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxvc.methods import build_method
from jaxvc.models import lora
from tests.conftest import relative_error
from tests.tiny_models import method_config


def tiny_config(**overrides):
    return method_config("configs/disentangled_s2v.py:tiny", **overrides)


@pytest.fixture(scope="module")
def method():
    return build_method(tiny_config())


@pytest.fixture(scope="module")
def fresh(method):
    return method.init_params(jax.random.key(0))


def random_inputs(method, params, frames=4, seed=0):
    rng = np.random.default_rng(seed)
    size, channels = method.latent_frame_size, method.transformer.config.in_channels
    x = jnp.asarray(rng.standard_normal((2, frames, *size, channels)), jnp.float32)
    reference = jnp.asarray(rng.standard_normal((2, 1, *size, channels)), jnp.float32)
    text = method.encode_text(params, jnp.asarray(method.tokenizer([method.prompt("a red star"), "a cat"])))
    return x, jnp.array([900.0, 250.0]), text, reference


def with_random_adapters(params):
    trained = {k: jax.tree.map(lambda v, s=scale: s * jax.random.normal(jax.random.key(v.size), v.shape), params[
        "params"][k]) for k, scale in (("adapters", 0.05), ("reference_time_lora", 0.5))}
    return {"params": {**params["params"], **trained}}


def test_lora_sites_and_what_trains(method, fresh):
    sites = {"/".join(s) for s in lora.adapter_sites(fresh["params"]["adapters"]["lora"])}
    per_block = {f"attn{i}/{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")} | {"ffn/net_2"}
    assert sites == {f"blocks_{b}/{p}" for b in range(2) for p in per_block} | {
        "patch_embedding", "condition_embedder/text_embedder/linear_1", "condition_embedder/text_embedder/linear_2"}
    flat = ["/".join(p) for p in traverse_util.flatten_dict(fresh)]
    trainable = [p for p in flat if method.trainable(tuple(p.split("/")))]
    assert trainable and all(p.split("/")[1] in ("adapters", "reference_time_lora") for p in trainable)
    table = fresh["params"]["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    assert table.shape[0] == method.base_vocab_size + 1
    x, t, text, reference = random_inputs(method, fresh)
    base = method.transformer.apply({"params": fresh["params"]["transformer"]}, x, t, text, reference_latent=reference)
    np.testing.assert_array_equal(np.asarray(method.velocity(fresh, x, t, text, reference)), np.asarray(base))


def test_cls_prefix_at_the_token_level_equals_the_text_prefix(method):
    captions = ["a red star bouncing", "word " * 90]  # the second fills the sequence: it must keep its EOS
    prefixed = np.asarray(method.with_cls(jnp.asarray(method.tokenizer(captions))))
    expected = method.tokenizer([method.prompt(c) for c in captions])
    np.testing.assert_array_equal(prefixed, expected)
    assert prefixed[1, -1] == method.tokenizer.eos_token_id


def test_reference_dropping(method, fresh):
    masks = {mode: np.asarray(build_method(tiny_config(**{"model.options.drop_mode": mode})).reference_mask(
        jax.random.key(1), 4000, 16)) for mode in ("full", "subset")}
    full, subset = masks["full"], masks["subset"]
    assert np.all(full.all(axis=1) | ~full.any(axis=1)) and abs(full[:, 0].mean() - 0.5) < 0.03
    assert abs(subset.mean() - 0.5) < 0.01 and np.mean(subset.any(axis=1) & ~subset.all(axis=1)) > 0.99

    params = with_random_adapters(fresh)
    x, t, text, reference = random_inputs(method, fresh)
    with lora.applied([lora.AppliedAdapter(method.spec, params["params"]["adapters"]["lora"])]):
        plain = method.transformer.apply({"params": fresh["params"]["transformer"]}, x, t, text)
    patches = np.prod(method.latent_frame_size) // 4  # 2 x 2 patches of the reference latent
    dropped = method.velocity(params, x, t, text, reference, jnp.zeros((2, patches), bool))
    assert relative_error(dropped, plain) < 1e-5  # the reference's time LoRA reaches nothing without its tokens
    kept = method.velocity(params, x, t, text, reference)
    no_time_lora = {"params": {**params["params"], "reference_time_lora": fresh["params"]["reference_time_lora"]}}
    assert relative_error(kept, method.velocity(no_time_lora, x, t, text, reference)) > 1e-4
    # options.lora_dropout drops the LoRA's inputs in training (a dropout_rng) only; 0 (the authors' code): none
    assert method.spec.dropout == 0.0
    dropping = build_method(tiny_config(**{"model.options.lora_dropout": 0.2}))
    assert dropping.spec.dropout == 0.2
    np.testing.assert_array_equal(np.asarray(dropping.velocity(params, x, t, text, reference)), np.asarray(kept))
    assert relative_error(dropping.velocity(params, x, t, text, reference, dropout_rng=jax.random.key(3)),
                          kept) > 1e-4


def test_task_switching_trains_both_tasks_and_generates(tmp_path):
    from jaxvc.dit_pipeline import SubjectDiTPipeline
    from jaxvc.pipeline import CustomVideoPipeline
    from jaxvc.train.cli import build_data
    from jaxvc.train.loop import Trainer

    config = tiny_config(steps=8, **{"checkpoint.every": 8, "data.weights.video": 0.5, "data.weights.image": 0.5})
    method = build_method(config)
    trainer = Trainer(config, method, tmp_path / "run")
    initial = jax.device_get(trainer.init_state().full_params())
    trainer.fit(lambda rows: build_data(config, rows, method.tokenizer))
    shapes = {dict((k, shape) for k, shape, _ in signature)["video"][:2] for signature in trainer._programs}
    # image-pair batches (1-frame targets) and video batches, one program each; the videos' batch is 3/4 of the
    # pairs' (config.data.batch_sizes: the authors' 8 / 6 per GPU), here 2 pairs and 1 video
    assert shapes == {(2, 1), (1, 5)}, shapes
    with pytest.raises(ValueError, match="data.batch_sizes.video 1 is not divisible by optim.accumulation_steps 2"):
        Trainer(tiny_config(**{"optim.accumulation_steps": 2}), method, tmp_path / "refused")
    state, _, _ = trainer.restore()
    trained = jax.device_get(state.full_params())
    changed = {"/".join(k) for k, v in traverse_util.flatten_dict(trained).items()
               if not np.array_equal(v, traverse_util.flatten_dict(initial)[k])}
    assert changed and all(p.split("/")[1] in ("adapters", "reference_time_lora") for p in changed)

    from safetensors import safe_open

    from jaxvc.convert.export_lora import export
    from jaxvc.train.trained_run import load_trained_run

    written = export(load_trained_run(tmp_path / "run"), tmp_path / "export")  # `jaxvc export-lora RUN OUT`
    assert written["skipped"] == ["reference_time_lora"]
    with safe_open(str(written["lora"]), "np") as exported:
        keys = set(exported.keys())
    assert "transformer.blocks.1.ffn.net.2.lora_A.weight" in keys and "transformer.patch_embedding.lora_B.weight" in keys
    assert len(keys) == 2 * len(lora.adapter_sites(trained["params"]["adapters"]["lora"]))

    pipe = CustomVideoPipeline.from_run(tmp_path / "run")
    assert isinstance(pipe, SubjectDiTPipeline) and pipe.takes_reference
    rng = np.random.default_rng(3)
    references = [jnp.asarray(rng.uniform(-1, 1, (1, 32, 32, 3)), jnp.float32) for _ in range(2)]
    kwargs = dict(num_inference_steps=3, num_frames=5, height=32, width=32, seed=0, guidance_scale=6.0)
    videos = [np.asarray(pipe.generate(r, "a subject", **kwargs)) for r in references]
    assert videos[0].shape == (1, 5, 32, 32, 3) and np.isfinite(videos[0]).all()
    assert not np.allclose(videos[0], videos[1])  # the subject's reference enters both guidance halves
    with pytest.raises(ValueError, match="reference image"):
        pipe.generate(None, "a subject", **kwargs)
    # Wan's own solver on the method's shifted sigmas (the model then sees integer timesteps, as in diffusers)
    euler = pipe.generate(references[0], "a subject", decode=False, **kwargs)
    unipc = pipe.generate(references[0], "a subject", decode=False, sampler="unipc", **kwargs)
    assert np.isfinite(unipc).all() and not np.allclose(unipc, euler)
    with pytest.raises(ValueError, match="does not run a flow-matching"):
        pipe.generate(references[0], "a subject", sampler="dpm++-karras", **kwargs)

    # --dtype bfloat16: the DiT computes in bf16 and keeps its matrices in it (its float32 islands and the LoRA as
    # they are); the latents equal those of the run's float32 weights in the same bf16 model
    stored = CustomVideoPipeline.from_run(tmp_path / "run", dtype="bfloat16")
    dit = traverse_util.flatten_dict(stored.params["params"]["transformer"])
    assert dit[("blocks_0", "attn1", "to_q", "kernel")].dtype == jnp.bfloat16
    assert dit[("blocks_0", "scale_shift_table")].dtype == jnp.float32
    bf16_run = load_trained_run(tmp_path / "run", overrides={"compute_dtype": "bfloat16"})
    float32_weights = bf16_run.method.pipeline(bf16_run.params)
    np.testing.assert_array_equal(np.asarray(stored.generate(references[0], "a subject", decode=False, **kwargs)),
                                  np.asarray(float32_weights.generate(references[0], "a subject", decode=False,
                                                                      **kwargs)))


def test_umt5_text_side_from_transformers_folders(tmp_path):
    """Wan's text side: a UMT5 encoder and T5 tokenizer from transformers folders. "<cls>" gets the next id and a
    row (the mean of the table); the states are zero past each prompt's </s>, as Wan's pipeline feeds them; they
    equal transformers' encoder on the same ids; the token-level prefix equals the text prefix."""
    import torch
    import transformers

    from tests.tiny_models import build_tiny_t5_folder

    root = build_tiny_t5_folder(tmp_path, vocab_size=0)  # a table without spare rows: <cls> needs a new one
    method = build_method(tiny_config(**{"model.text_encoder": str(root / "text_encoder"),
                                         "model.tokenizer": str(root / "tokenizer"), "model.max_text_length": 16}))
    params = method.init_params(jax.random.key(0))
    table = params["params"]["text_encoder"]["shared"]["embedding"]
    reference = transformers.UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    original = reference.shared.weight.detach().numpy()
    cls_id = method.tokenizer.added_tokens["<cls>"]
    np.testing.assert_allclose(table[cls_id], original.mean(axis=0), rtol=1e-5, atol=1e-7)
    captions = ["a red star bouncing", "a dog"]
    ids = np.asarray(method.with_cls(jnp.asarray(method.tokenizer(captions))))
    np.testing.assert_array_equal(ids, method.tokenizer([method.prompt(c) for c in captions]))
    states = np.asarray(method.encode_text(params, jnp.asarray(ids)))
    mask = ids != method.tokenizer.pad_token_id
    assert np.all(states[~mask] == 0) and mask[1].sum() < mask[0].sum()
    with torch.no_grad():  # transformers on the same ids with <cls>'s row appended
        reference.resize_token_embeddings(table.shape[0])
        reference.shared.weight[cls_id] = torch.from_numpy(np.array(table[cls_id]))
        expected = reference(torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
    assert relative_error(states[mask], expected[mask]) < 1e-5


def test_wan_pipeline_folder_loads_every_part_and_the_latents_are_the_wan_vae_s(tmp_path):
    """``model.pretrained`` = a diffusers Wan pipeline folder (transformer/, text_encoder/, tokenizer/, vae/, each a
    tiny random model saved in the real format): every part loads from it, and the method's latents are the Wan VAE's
    posterior means normalized as Wan's pipelines do, (mean - latents_mean) / latents_std, streamed in 4-frame
    chunks. The real-size variant asks for those files by name."""
    import diffusers
    import torch

    from configs.disentangled_s2v import get_config
    from jaxvc.methods.disentangled_s2v import from_config
    from tests.tiny_models import build_tiny_t5_folder

    root = build_tiny_t5_folder(tmp_path / "Wan-tiny-Diffusers")
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                    in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=40,
                                    num_layers=1).save_pretrained(root / "transformer")
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[True, True], scale_factor_spatial=4,
                                     latents_mean=[0.5, -0.5, 0.0, 1.0], latents_std=[2.0, 0.5, 1.0, 3.0]).eval()
    vae.save_pretrained(root / "vae")
    method = build_method(tiny_config(**{"model.pretrained": str(root), "model.max_text_length": 16,
                                         "model.vae_chunk_frames": 4, "model.num_frames": 9}))
    assert method.t5 and method.vae.is_wan and method.transformer.config.num_layers == 1
    params = method.init_params(jax.random.key(0))
    video = np.random.default_rng(0).uniform(-1, 1, (1, 9, 32, 32, 3)).astype(np.float32)
    latents = np.asarray(jax.jit(method.encode_pixels)(params, jnp.asarray(video)))
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(np.moveaxis(video, -1, 1))).latent_dist.mean.numpy()
    stats = [np.asarray(vae.config[k], np.float32)[:, None, None, None] for k in ("latents_mean", "latents_std")]
    expected = np.moveaxis((mean - stats[0]) / stats[1], 1, -1)
    assert latents.shape == (1, 3, 8, 8, 4) and relative_error(latents, expected) < 1e-5

    real = get_config("wan21_1.3b")
    assert (real.model.num_frames - 1) % 4 == 0 and real.model.vae_variant == "wan21"
    with pytest.raises(ValueError, match="reads Wan's UMT5 text encoder from files"):
        from_config(real)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames .* got 4"):
        build_method(tiny_config(**{"model.num_frames": 4}))


def test_sharded_loss_and_gradients_equal_one_device():
    """data 2 x fsdp 4 on 8 simulated devices, a video batch: the Wan VAE's streamed encoding, the DiT (sharded by
    the rule table) with its reference stream, the dropped reference tokens and the LoRA gradients."""
    from tests.multidevice import run_with_devices, sharded_loss_script

    run_with_devices(sharded_loss_script("configs/disentangled_s2v.py:tiny", perturb=("adapters",),
                                         sharded_parts=("transformer",)))


def test_vae_tiles_are_a_setting_of_the_method():
    """config.model.vae_tile: the method's latents come from the Wan VAE's tiled encoder (wan_vae_tiling)."""
    from jaxvc.models.wan_vae_tiling import encode_wan_tiled

    method = build_method(tiny_config(**{"model.vae_tile": 24, "model.vae_tile_stride": 16}))
    assert (method.vae.tile, method.vae.tile_stride) == (24, 16)
    params = {"params": jax.jit(method.vae.init)(jax.random.key(0))}  # eager: ~200 one-op programs
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 5, 32, 32, 3)), jnp.float32)
    latents = jax.jit(method.encode_pixels)({"params": {"vae": params["params"]}}, video)
    mean, _ = jax.jit(lambda p, v: encode_wan_tiled(method.vae.module, p, v, tile=24, stride=16))(params, video)
    np.testing.assert_allclose(np.asarray(latents), np.asarray(mean), rtol=1e-6, atol=1e-6)  # tiny: mean 0, std 1


def test_a_batch_of_subjects_is_each_made_alone(method, fresh):
    """``generate`` with a list of prompts (``jaxvc generate --prompts --batch-size``, the trainer's validation
    samples): two subjects, prompts and seeds in one sampling loop, each the video made alone (to float32
    summation order), with the SDE solver's per-step noise drawn from each video's own seed."""
    pipe = method.pipeline(with_random_adapters(fresh))
    rng = np.random.default_rng(3)
    references = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    options = dict(num_frames=5, height=32, width=32, num_inference_steps=3, decode=False, sampler="dpm++-sde")
    batch = pipe.generate(references, ["a dog runs", "a cat sits"], negative_prompt=["", "blurry"], seed=[4, 9],
                          **options)
    for i, (prompt, negative, seed) in enumerate((("a dog runs", "", 4), ("a cat sits", "blurry", 9))):
        alone = pipe.generate(references[i:i + 1], prompt, negative_prompt=negative, seed=seed, **options)
        assert relative_error(batch[i], alone[0]) < 1e-5, i
