"""jaxvc AutoencoderKL + convert/vae.py against diffusers AutoencoderKL (float32, randomized weights).

Each torch model is saved with ``save_pretrained`` and loaded through ``jaxvc.convert.vae.load_vae`` from the files,
so these tests prove the loader as much as the modules. Also covered: deprecated attention key names (2-D and 1x1-conv
shaped), fp16 variants and sharded files, loader errors, and the frame-folding ``encode_video``/``decode_video``.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import save_file  # noqa: E402

from jaxvc.convert.state_dict import WeightFileError  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.convert.vae import load_vae  # noqa: E402
from jaxvc.models.vae import (AutoencoderKL, VAEConfig, abstract_vae_params, decode_video,  # noqa: E402
                              encode_video)

PARITY = 1e-5
# (name, diffusers kwargs). Image sizes are non-square so a height/width mix-up cannot pass.
CONFIGS = {
    # PARITY.md §1c: the smallest VAE (124 keys).
    "smallest": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8),
    # PARITY.md §1b: SD VAE topology with tiny widths (248 keys, the real file's names).
    "sd_topology": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4,
                        norm_num_groups=8),
    # Odd: 3 levels, groups 4, 3 latent channels, no (post_)quant_conv.
    "odd": dict(block_out_channels=(8, 16, 24), layers_per_block=1, latent_channels=3, norm_num_groups=4,
                use_quant_conv=False, use_post_quant_conv=False),
}
KEY_COUNTS = {"smallest": 124, "sd_topology": 248}


def randomize_(module, std=0.1, seed=0):
    """Normal weights everywhere (zeros and ones hide bugs); norm scales around 1 to keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_scale = param.ndim == 1 and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_scale else noise)
    return module


def build_torch_vae(name):
    levels = len(CONFIGS[name]["block_out_channels"])
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                                    up_block_types=("UpDecoderBlock2D",) * levels, **CONFIGS[name])
    return randomize_(model.eval(), seed=len(name))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (torch model, folder)} saved with diffusers' save_pretrained."""
    out = {}
    for name in CONFIGS:
        model = build_torch_vae(name)
        folder = tmp_path_factory.mktemp(f"vae_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers(saved, name):
    model, folder = saved[name]
    config, params = load_vae(folder)
    assert config.block_out_channels == CONFIGS[name]["block_out_channels"]
    if name in KEY_COUNTS:
        assert len(model.state_dict()) == KEY_COUNTS[name]
    factor = config.downsample_factor
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 4 * factor, 6 * factor, generator=generator)
    latents = torch.randn(2, config.latent_channels, 4, 6, generator=generator)
    with torch.no_grad():
        posterior = model.encode(images).latent_dist
        decoded = model.decode(latents).sample
    vae = AutoencoderKL(config)
    mean, logvar = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode))(params, nhwc(images.numpy()))
    ours_decoded = jax.jit(lambda p, z: vae.apply(p, z, method=AutoencoderKL.decode))(params, nhwc(latents.numpy()))
    errors = {"mean": relative_error(nchw(mean), posterior.mean.numpy()),
              "logvar": relative_error(nchw(logvar), posterior.logvar.numpy()),
              "decode": relative_error(nchw(ours_decoded), decoded.numpy())}
    print(f"VAE {name}: relative errors {errors}")
    assert all(e < PARITY for e in errors.values()), errors
    assert mean.shape == (2, 4, 6, config.latent_channels)
    assert ours_decoded.shape == (2, 4 * factor, 6 * factor, 3)


def _rewrite_attention_keys(state_dict, conv_shaped):
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state_dict.items():
        value = value.detach().numpy().copy()
        if ".attentions." in key:
            for new, old in renames.items():
                if f".{new}." in key:
                    key = key.replace(f".{new}.", f".{old}.")
                    if conv_shaped and value.ndim == 2:
                        value = value[:, :, None, None]  # an ldm-style 1x1 conv weight (C, C, 1, 1)
        out[key] = value
    return out


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_deprecated_attention_names_load(saved, tmp_path, conv_shaped):
    model, folder = saved["smallest"]
    old = _rewrite_attention_keys(model.state_dict(), conv_shaped)
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    if not conv_shaped:  # the fixture is a genuine old-format file: diffusers itself loads it to the same model
        reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    _, params_old = load_vae(tmp_path)
    _, params_new = load_vae(folder)
    jax.tree.map(np.testing.assert_array_equal, params_old, params_new)


def test_fp16_variant_and_sharded_files(saved, tmp_path):
    model, folder = saved["smallest"]
    _, reference = load_vae(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, params = load_vae(sharded)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    half = tmp_path / "half"
    build_torch_vae("smallest").half().save_pretrained(half, variant="fp16")
    assert (half / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, params = load_vae(half, variant="fp16")
    # fp16 weights arrive as float32 parameters equal to the rounded reference values
    for ours, full in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, np.asarray(full, np.float16).astype(np.float32))


def test_loader_errors_name_the_problem(saved, tmp_path):
    _, folder = saved["smallest"]
    config = json.loads((folder / "config.json").read_text())
    config["layers_per_block"] = 2  # the file has 1 resnet per level: keys go missing
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    missing = r"(?s)32 missing from the checkpoint.*encoder/down_blocks_0/resnets_1/conv1/kernel"
    with pytest.raises(CheckpointMismatchError, match=missing):
        load_vae(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(WeightFileError, match="config.json"):
        load_vae(tmp_path)
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({**config, "down_block_types": ["DownBlock2D", "DownEncoderBlock2D"]})


def test_sd_variant_matches_real_sd_config():
    sd_config = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
                 "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
                 "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert VAEConfig.from_diffusers(sd_config) == VAEConfig.variant("sd")
    params = jax.tree.leaves(abstract_vae_params(VAEConfig.variant("sd")))
    assert len(params) == 248 and sum(int(np.prod(p.shape)) for p in params) == 83_653_863  # the SD VAE's size


@pytest.fixture(scope="module")
def smallest_loaded(saved):
    return load_vae(saved["smallest"][1])


def test_encode_video_folds_frames(smallest_loaded):
    config, params = smallest_loaded
    vae = AutoencoderKL(config)
    encode = jax.jit(functools.partial(encode_video, vae), static_argnames=("sample", "chunk"))
    video = jax.random.normal(jax.random.key(0), (2, 3, 16, 24, 3))  # (B, F, H, W, 3)
    encode_one = jax.jit(lambda x: vae.apply(params, x, method=AutoencoderKL.encode))
    per_frame = [[encode_one(video[b, f][None]) for f in range(3)] for b in range(2)]
    mean = jnp.stack([jnp.stack([per_frame[b][f][0][0] for f in range(3)]) for b in range(2)])  # (B, F, h, w, 4)
    logvar = jnp.stack([jnp.stack([per_frame[b][f][1][0] for f in range(3)]) for b in range(2)])
    whole = encode(params, video)
    assert whole.shape == (2, 3, 8, 12, 4)
    np.testing.assert_allclose(whole, mean * config.scaling_factor, rtol=1e-5, atol=1e-6)
    # A posterior sample is mean + exp(logvar / 2) * eps with eps drawn over the folded (B*F, h, w, 4) latents;
    # 6 frames in chunks of 4 run the lax.map path with one zero-padded chunk.
    sampled = encode(params, video, rng=jax.random.key(3), sample=True, chunk=4)
    eps = jax.random.normal(jax.random.key(3), (6, 8, 12, 4)).reshape(mean.shape)
    np.testing.assert_allclose(sampled, (mean + jnp.exp(0.5 * logvar) * eps) * config.scaling_factor,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs an rng"):
        encode_video(vae, params, video, sample=True)


def test_decode_video_inverts_scaling_per_frame(smallest_loaded):
    config, params = smallest_loaded
    config = dataclasses.replace(config, shift_factor=0.25)  # exercise the shift as well
    vae = AutoencoderKL(config)
    latents = jax.random.normal(jax.random.key(1), (2, 3, 8, 12, 4))  # (B, F, h, w, 4), already scaled
    video = jax.jit(functools.partial(decode_video, vae), static_argnames=("chunk",))(params, latents, chunk=5)
    assert video.shape == (2, 3, 16, 24, 3)
    decode_one = jax.jit(lambda z: vae.apply(params, z[None], method=AutoencoderKL.decode)[0])
    for b in range(2):
        for f in range(3):
            expected = decode_one(latents[b, f] / config.scaling_factor + 0.25)
            np.testing.assert_allclose(video[b, f], expected, rtol=1e-5, atol=1e-5)
    frames = jax.random.uniform(jax.random.key(2), (1, 2, 16, 24, 3), minval=-1, maxval=1)
    mean = jax.jit(lambda x: vae.apply(params, x, method=AutoencoderKL.encode)[0])(frames[0])
    encoded = jax.jit(functools.partial(encode_video, vae))(params, frames)
    np.testing.assert_allclose(encoded[0], (mean - 0.25) * config.scaling_factor, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_tracks_float32(smallest_loaded):
    config, params = smallest_loaded
    images = jax.random.normal(jax.random.key(4), (1, 16, 16, 3))
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        vae = AutoencoderKL(dataclasses.replace(config, dtype=dtype))
        outputs[dtype] = jax.jit(vae.apply)(params, images)  # (reconstruction, mean, logvar), float32 out
    for ours, reference in zip(outputs[jnp.bfloat16], outputs[jnp.float32]):
        assert ours.dtype == jnp.float32
        assert relative_error(ours, reference) < 3e-2
