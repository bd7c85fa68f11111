"""Wan text-to-video end to end: a diffusers ``WanPipeline`` folder (tiny random DiT, UMT5 encoder with its
tokenizer, Wan VAE and UniPC scheduler, written by ``save_pretrained``) generates in jaxvc what diffusers' own
``WanPipeline`` generates from the same starting noise: the latents after the sampling loop and the decoded video;
``jaxvc generate --model FOLDER`` writes the video and refuses a reference image."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SETTINGS = dict(num_frames=5, height=32, width=32, num_inference_steps=6, guidance_scale=5.0)
PROMPT, NEGATIVE = "a red star  moves &amp; jumps", "blurry"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.tiny_models import build_tiny_t5_folder

    parts = build_tiny_t5_folder(tmp_path_factory.mktemp("wan_parts"))
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16,
                                                  ffn_dim=40, num_layers=2).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[True, True], scale_factor_spatial=4,
                                     latents_mean=[0.5, -0.5, 0.0, 1.0], latents_std=[2.0, 0.5, 1.0, 3.0]).eval()
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)  # as Wan's folders ship it
    pipe = diffusers.WanPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(parts / "tokenizer"),
                                 text_encoder=transformers.UMT5EncoderModel.from_pretrained(parts / "text_encoder"),
                                 transformer=transformer, vae=vae, scheduler=scheduler)
    out = tmp_path_factory.mktemp("wan") / "Wan-tiny-T2V-Diffusers"
    pipe.save_pretrained(out)
    return out


def test_generation_matches_diffusers_wan_pipeline(folder):
    from jaxvc.pipeline import CustomVideoPipeline
    from jaxvc.wan_pipeline import WanTextToVideoPipeline

    pipe = CustomVideoPipeline.from_pretrained(folder)
    assert isinstance(pipe, WanTextToVideoPipeline) and not pipe.takes_reference
    latents = np.asarray(pipe.generate(None, PROMPT, negative_prompt=NEGATIVE, seed=3, decode=False, **SETTINGS))
    video = np.asarray(pipe.generate(None, PROMPT, negative_prompt=NEGATIVE, seed=3, **SETTINGS))
    assert latents.shape == (1, 2, 8, 8, 4) and video.shape == (1, 5, 32, 32, 3)

    x_T = jax.random.normal(jax.random.key(3), latents.shape, jnp.float32)  # the pipeline's starting noise
    reference = diffusers.WanPipeline.from_pretrained(folder)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, **SETTINGS,
                  latents=torch.from_numpy(np.moveaxis(np.asarray(x_T), -1, 1)))
    with torch.no_grad():
        expected_latents = np.moveaxis(reference(output_type="latent", **kwargs).frames.numpy(), 1, -1)
        expected_video = reference(output_type="np", **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
    latent_error = relative_error(latents, expected_latents)
    video_error = np.abs((np.clip(video, -1, 1) + 1) / 2 - expected_video).max()
    print(f"Wan T2V vs diffusers WanPipeline: latents {latent_error:.1e} relative, video {video_error:.1e} max")
    assert latent_error < 1e-5 and video_error < 1e-5
    assert np.abs(expected_latents - np.moveaxis(kwargs["latents"].numpy(), 1, -1)).max() > 0.1  # it did sample
    # generate_videos, as on the UNet pipelines: one video per prompt (seed + i), uint8, the same as called alone
    videos = pipe.generate_videos(None, [PROMPT, "a cat"], negative_prompts=NEGATIVE, seeds=3, **SETTINGS)
    assert videos.shape == (2, 5, 32, 32, 3) and videos.dtype == np.uint8
    np.testing.assert_array_equal(videos[0], pipe(None, PROMPT, negative_prompt=NEGATIVE, seed=3, progress=False,
                                                  **SETTINGS))


def test_generate_command_writes_the_video_and_refuses_a_reference(folder, tmp_path):
    from PIL import Image

    from jaxvc.cli import main as jaxvc_main

    out = tmp_path / "out"
    args = ["generate", "--model", str(folder), "--prompt", "a star jumps", "--frames", "5", "--height", "32",
            "--width", "32", "--steps", "3", "--out", str(out), "--name", "star", "--sampler", "dpm++"]
    assert jaxvc_main(args) == 0
    with Image.open(out / "star.gif") as gif:
        assert gif.n_frames == 5
    reference = tmp_path / "ref.png"
    Image.new("RGB", (32, 32)).save(reference)
    assert jaxvc_main(args + ["--reference", str(reference)]) == 2


def test_a_merged_lora_matches_diffusers_load_lora_weights(folder, tmp_path):
    """A Wan LoRA file (diffusers' ``transformer.<module>.lora_A/B`` keys, written by ``save_lora``) merged by
    ``--lora`` generates what diffusers' ``WanPipeline.load_lora_weights`` generates."""
    pytest.importorskip("peft")
    from jaxvc.convert.lora import save_lora
    from jaxvc.models import lora
    from jaxvc.models.wan import WanTransformer3D
    from jaxvc.wan_pipeline import WanTextToVideoPipeline

    pipe = WanTextToVideoPipeline.from_pretrained(folder)
    spec = lora.AdapterSpec(include=(r"blocks_\d+/attn1/to_(q|v)", r"blocks_\d+/attn2/to_k", r"blocks_\d+/ffn/net_2"),
                            rank=2, alpha=4.0)
    example = (jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 512, 32)))
    sites = lora.find_sites(lambda: WanTransformer3D(pipe.transformer.config).init(jax.random.key(0), *example), spec)
    tree = jax.tree.map(lambda v: 0.3 * jax.random.normal(jax.random.key(v.size), v.shape),
                        lora.init_adapter(jax.random.key(1), sites, spec))
    path = save_lora(tmp_path / "wan_lora.safetensors", {"transformer": lora.AppliedAdapter(spec, tree)})
    settings = dict(SETTINGS, num_inference_steps=3)
    plain = np.asarray(pipe.generate(None, PROMPT, seed=1, decode=False, **settings))
    latents = np.asarray(pipe.merge_lora(path, scale=0.7).generate(None, PROMPT, seed=1, decode=False, **settings))
    reference = diffusers.WanPipeline.from_pretrained(folder)
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="subject")
    reference.set_adapters(["subject"], adapter_weights=[0.7])
    x_T = jax.random.normal(jax.random.key(1), latents.shape, jnp.float32)
    with torch.no_grad():
        expected = reference(prompt=PROMPT, output_type="latent", **settings,
                             latents=torch.from_numpy(np.moveaxis(np.asarray(x_T), -1, 1))).frames.numpy()
    assert relative_error(plain, latents) > 1e-3  # the LoRA changes the video
    assert relative_error(latents, np.moveaxis(expected, 1, -1)) < 1e-5


def test_wan22_ti2v_style_folder_as_text_to_video(tmp_path):
    """A Wan 2.2 TI2V-style folder (``expand_timesteps``: one timestep per token; the Wan 2.2 VAE with its 2x2
    patchify and residual levels) generates the latents diffusers' ``WanPipeline`` does: for text-to-video every
    token has the step's timestep, which is jaxvc's per-video path."""
    from jaxvc.wan_pipeline import WanTextToVideoPipeline
    from tests.tiny_models import build_tiny_t5_folder

    parts = build_tiny_t5_folder(tmp_path / "parts")
    torch.manual_seed(1)
    transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=16,
                                                  ffn_dim=40, num_layers=1).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                                     scale_factor_spatial=16, latents_mean=[0.1, 0.0, -0.1, 0.2],
                                     latents_std=[1.0, 2.0, 0.5, 1.5]).eval()
    pipe = diffusers.WanPipeline(tokenizer=transformers.AutoTokenizer.from_pretrained(parts / "tokenizer"),
                                 text_encoder=transformers.UMT5EncoderModel.from_pretrained(parts / "text_encoder"),
                                 transformer=transformer, vae=vae, expand_timesteps=True,
                                 scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                             use_flow_sigmas=True, flow_shift=5.0))
    pipe.save_pretrained(tmp_path / "ti2v")
    ours = WanTextToVideoPipeline.from_pretrained(tmp_path / "ti2v")
    settings = dict(num_frames=5, height=64, width=64, num_inference_steps=4, guidance_scale=5.0)
    latents = np.asarray(ours.generate(None, PROMPT, seed=2, decode=False, **settings))
    assert latents.shape == (1, 2, 4, 4, 4)
    x_T = jax.random.normal(jax.random.key(2), latents.shape, jnp.float32)
    with torch.no_grad():
        expected = pipe(prompt=PROMPT, output_type="latent", **settings,
                        latents=torch.from_numpy(np.moveaxis(np.array(x_T), -1, 1))).frames.numpy()
    assert relative_error(latents, np.moveaxis(expected, 1, -1)) < 1e-5
