"""Wan image-to-video and Wan 2.2's two experts end to end: tiny random diffusers folders written by
``save_pretrained`` generate in jaxvc what diffusers' own ``WanImageToVideoPipeline`` / ``WanPipeline`` generate from
the same starting noise and the same first (and last) frame, for every kind of Wan folder:

* Wan 2.1 I2V: the first frame's VAE latents and a 4-channel mask concatenated to the noisy latents, the CLIP
  vision tower's penultimate tokens cross-attended (``image_embedder``, ``add_k_proj``/``add_v_proj``);
* Wan 2.1 FLF2V: a last frame too (its mask channel, both images' CLIP tokens under ``pos_embed``);
* Wan 2.2 I2V A14B: two experts split at ``boundary_ratio``, with two guidance scales, no image encoder;
* Wan 2.2 TI2V-5B (``expand_timesteps``): the first latent frame replaced, its tokens at timestep 0;
* Wan 2.2 T2V A14B: the two experts in text-to-video.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT, NEGATIVE = "a red star turns &amp; jumps", "blurry"
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32,
            patch_size=8)  # 1 + 16 tokens


def _image(seed: int, size: int):
    """A smooth random RGB picture (PIL), exactly size x size so that neither side resizes it."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BILINEAR)


def _transformer(seed: int, in_channels: int, **extra):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                           in_channels=in_channels, out_channels=4, text_dim=32, freq_dim=16,
                                           ffn_dim=40, num_layers=2, **extra).eval()


def _wan21_vae():
    torch.manual_seed(7)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[True, True], scale_factor_spatial=4,
                                      latents_mean=[0.5, -0.5, 0.0, 1.0], latents_std=[2.0, 0.5, 1.0, 3.0]).eval()


def _folder(root, kind: str):
    """A saved diffusers pipeline folder of one kind (module docstring)."""
    from tests.tiny_models import build_tiny_t5_folder

    parts = build_tiny_t5_folder(root / "parts")
    text = dict(tokenizer=transformers.AutoTokenizer.from_pretrained(parts / "tokenizer"),
                text_encoder=transformers.UMT5EncoderModel.from_pretrained(parts / "text_encoder"),
                scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                            flow_shift=3.0))
    if kind == "t2v-a14b":
        pipe = diffusers.WanPipeline(**text, vae=_wan21_vae(), transformer=_transformer(1, 4),
                                     transformer_2=_transformer(2, 4), boundary_ratio=0.875)
    elif kind == "ti2v":
        torch.manual_seed(8)
        vae = diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2],
                                         num_res_blocks=1, is_residual=True, in_channels=12, out_channels=12,
                                         patch_size=2, scale_factor_spatial=16, latents_mean=[0.1, 0.0, -0.1, 0.2],
                                         latents_std=[1.0, 2.0, 0.5, 1.5]).eval()
        pipe = diffusers.WanImageToVideoPipeline(**text, vae=vae, transformer=_transformer(3, 4), expand_timesteps=True)
    elif kind == "i2v-a14b":
        pipe = diffusers.WanImageToVideoPipeline(**text, vae=_wan21_vae(), transformer=_transformer(4, 12),
                                                 transformer_2=_transformer(5, 12), boundary_ratio=0.9)
    else:  # Wan 2.1 I2V / FLF2V: CLIP image tokens (FLF2V: of two images, with a position table)
        torch.manual_seed(6)
        encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)).eval()
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                    crop_size={"height": 32, "width": 32})
        tokens = 1 + (CLIP["image_size"] // CLIP["patch_size"]) ** 2
        extra = dict(image_dim=CLIP["hidden_size"], added_kv_proj_dim=24,
                     pos_embed_seq_len=2 * tokens if kind == "flf2v" else None)
        transformer = _transformer(9, 12, **extra)
        with torch.no_grad():  # the position table starts at zero: make it matter
            if transformer.condition_embedder.image_embedder.pos_embed is not None:
                transformer.condition_embedder.image_embedder.pos_embed.normal_(0.0, 0.5)
        pipe = diffusers.WanImageToVideoPipeline(**text, vae=_wan21_vae(), transformer=transformer,
                                                 image_encoder=encoder, image_processor=processor)
    out = root / f"Wan-tiny-{kind}-Diffusers"
    pipe.save_pretrained(out)
    return out, type(pipe)


@pytest.fixture(autouse=True)
def _no_ftfy(monkeypatch):
    """diffusers' I2V module calls ``ftfy.fix_text`` unguarded (its T2V module checks that ftfy is installed); ftfy
    is not a dependency here, and leaves these plain-ASCII prompts as they are."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v

    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _compare(root, kind, settings, *, last_frame=False, **extra):
    """jaxvc's latents and video vs diffusers' from the same noise; returns jaxvc's pipeline and latents."""
    from jaxvc.pipeline import CustomVideoPipeline, load_reference_image

    folder, reference_class = _folder(root, kind)
    pipe = CustomVideoPipeline.from_pretrained(folder)
    size = settings["height"]
    first, last = _image(0, size), (_image(1, size) if last_frame else None)
    common = dict(negative_prompt=NEGATIVE, **settings, **extra)
    takes_image = reference_class is diffusers.WanImageToVideoPipeline
    pixels = lambda image: None if image is None else jnp.asarray(load_reference_image(image, size, size))[None]
    ours = dict(common, last_image=pixels(last), seed=3)
    reference_pixels = pixels(first) if takes_image else None
    latents = np.asarray(pipe.generate(reference_pixels, PROMPT, decode=False, **ours))
    video = np.asarray(pipe.generate(reference_pixels, PROMPT, **ours))[0]  # (F, H, W, 3) in [-1, 1]

    x_T = jax.random.normal(jax.random.key(3), latents.shape, jnp.float32)  # the pipeline's starting noise
    reference = reference_class.from_pretrained(folder)
    kwargs = dict(common, prompt=PROMPT, latents=torch.from_numpy(np.moveaxis(np.array(x_T), -1, 1)))
    if takes_image:
        kwargs.update(image=first, **({"last_image": last} if last_frame else {}))
    with torch.no_grad():
        expected_latents = np.moveaxis(reference(output_type="latent", **kwargs).frames.numpy(), 1, -1)
        expected_video = reference(output_type="np", **kwargs).frames[0]  # (F, H, W, 3) in [0, 1]
    latent_error = relative_error(latents, expected_latents)
    video_error = np.abs((np.clip(video, -1, 1) + 1) / 2 - expected_video).max()
    print(f"Wan {kind} vs diffusers: latents {latent_error:.1e} relative, video {video_error:.1e} max")
    assert latent_error < 1e-5 and video_error < 1e-5
    assert np.abs(expected_latents - np.asarray(x_T)).max() > 0.1  # it did sample
    return pipe, latents


SMALL = dict(num_frames=5, height=32, width=32, num_inference_steps=6, guidance_scale=5.0)


def test_wan21_i2v_matches_diffusers(tmp_path):
    pipe, _ = _compare(tmp_path, "i2v", SMALL)
    assert pipe.transformer.config.in_channels == 12 and pipe.image_encoder is not None


def test_flf2v_last_frame_matches_diffusers(tmp_path):
    pipe, with_last = _compare(tmp_path, "flf2v", SMALL, last_frame=True)
    assert pipe.transformer.config.pos_embed_seq_len == 34  # two images' 17 CLIP tokens


def test_wan22_i2v_two_experts_match_diffusers(tmp_path):
    from jaxvc.wan_i2v_pipeline import WanImageToVideoPipeline

    pipe, latents = _compare(tmp_path, "i2v-a14b", SMALL, guidance_scale_2=2.0)
    assert isinstance(pipe, WanImageToVideoPipeline) and pipe.has_two_experts and pipe.image_encoder is None
    high = pipe.high_noise_steps(pipe.sampler(SMALL["num_inference_steps"]))
    assert high.any() and not high.all()  # both experts denoised some steps
    # the second expert and its scale are used: another scale for it gives other latents
    other = pipe(_image(0, 32), PROMPT, negative_prompt=NEGATIVE, seed=3, output_type="latent", progress=False,
                 **dict(SMALL, guidance_scale_2=4.0))  # the uint8 entry point: the same image, fitted by jaxvc
    assert relative_error(other[None], latents) > 1e-3


def test_wan22_ti2v_image_to_video_matches_diffusers(tmp_path):
    from jaxvc.pipeline import load_reference_image

    pipe, latents = _compare(tmp_path, "ti2v", dict(SMALL, height=64, width=64, num_inference_steps=4))
    pixels = jnp.asarray(load_reference_image(_image(0, 64), 64, 64))[None, None]  # (1, 1, H, W, 3)
    first = pipe._encode["video"](pipe.params["vae"], pixels)  # the pipeline's own jitted encoder
    assert np.array_equal(latents[:, :1], np.asarray(first))  # the first latent frame is the image's own, exactly


def test_wan22_t2v_two_experts_match_diffusers(tmp_path):
    pipe, _ = _compare(tmp_path, "t2v-a14b", SMALL, guidance_scale_2=3.0)
    assert pipe.has_two_experts and not pipe.takes_reference


def test_generate_command_takes_the_first_and_last_frames(tmp_path):
    from PIL import Image

    from jaxvc.cli import main as jaxvc_main

    folder, _ = _folder(tmp_path, "flf2v")
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    _image(0, 48).save(first)  # not the video's size: fitted (cover + centre crop) to 32 x 32
    _image(1, 32).save(last)
    out = tmp_path / "out"
    args = ["generate", "--model", str(folder), "--prompt", "a star jumps", "--frames", "5", "--height", "32",
            "--width", "32", "--steps", "2", "--out", str(out), "--name", "star"]
    assert jaxvc_main(args + ["--reference", str(first), "--last-frame", str(last)]) == 0
    with Image.open(out / "star.gif") as gif:
        assert gif.n_frames == 5
    assert jaxvc_main(args) == 2  # no first frame
    assert jaxvc_main(args + ["--reference", str(first), "--guidance-scale-2", "3"]) == 2  # one expert
    assert jaxvc_main(args + ["--reference", str(first), "--lora-2", str(tmp_path / "any.safetensors")]) == 2


def test_loras_into_each_expert_match_diffusers(tmp_path):
    """A LoRA merged into the high-noise expert and another into the low-noise one (``--lora``, ``--lora-2``)
    generate what diffusers' ``load_lora_weights`` (with ``load_into_transformer_2`` for the second) generates."""
    pytest.importorskip("peft")
    from jaxvc.convert.lora import save_lora
    from jaxvc.models import lora
    from jaxvc.models.wan import WanTransformer3D
    from jaxvc.pipeline import CustomVideoPipeline

    folder, _ = _folder(tmp_path, "t2v-a14b")
    pipe = CustomVideoPipeline.from_pretrained(folder)
    spec = lora.AdapterSpec(include=(r"blocks_\d+/attn1/to_(q|v)", r"blocks_\d+/ffn/net_2"), rank=2, alpha=4.0)
    example = (jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 512, 32)))
    sites = lora.find_sites(lambda: WanTransformer3D(pipe.transformer.config).init(jax.random.key(0), *example), spec)
    files = []
    for seed in (1, 2):
        tree = jax.tree.map(lambda v: 0.3 * jax.random.normal(jax.random.key(v.size + seed), v.shape),
                            lora.init_adapter(jax.random.key(seed), sites, spec))
        adapters = {"transformer": lora.AppliedAdapter(spec, tree)}
        files.append(save_lora(tmp_path / f"expert_{seed}.safetensors", adapters))
    settings = dict(SMALL, num_inference_steps=4, guidance_scale_2=3.0)
    plain = np.asarray(pipe.generate(None, PROMPT, seed=1, decode=False, **settings))
    pipe.merge_lora(files[0]).merge_lora(files[1], into="transformer_2")
    latents = np.asarray(pipe.generate(None, PROMPT, seed=1, decode=False, **settings))
    reference = diffusers.WanPipeline.from_pretrained(folder)
    reference.load_lora_weights(str(tmp_path), weight_name=files[0].name, adapter_name="high")
    reference.load_lora_weights(str(tmp_path), weight_name=files[1].name, adapter_name="low",
                                load_into_transformer_2=True)
    x_T = jax.random.normal(jax.random.key(1), latents.shape, jnp.float32)
    with torch.no_grad():
        expected = reference(prompt=PROMPT, output_type="latent", **settings,
                             latents=torch.from_numpy(np.moveaxis(np.array(x_T), -1, 1))).frames.numpy()
    error = relative_error(latents, np.moveaxis(expected, 1, -1))
    # merged as the experts load (from_pretrained(lora=, lora_2=), what `jaxvc generate --lora --lora-2` does)
    at_load = CustomVideoPipeline.from_pretrained(folder, lora=[(str(files[0]), 1.0)], lora_2=[(str(files[1]), 1.0)])
    load_error = relative_error(np.asarray(at_load.generate(None, PROMPT, seed=1, decode=False, **settings)),
                                np.moveaxis(expected, 1, -1))
    print(f"Wan 2.2 two experts with a LoRA each vs diffusers: {error:.1e} (merged as they load: {load_error:.1e})")
    assert relative_error(plain, latents) > 1e-3 and error < 1e-5 and load_error < 1e-5

