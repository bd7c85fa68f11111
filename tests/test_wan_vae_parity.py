"""jaxvc AutoencoderKLWan + convert/wan_vae.py against diffusers 0.42.1 AutoencoderKLWan (float32, random weights).

Each torch VAE is saved with ``save_pretrained`` (or rewritten in the original Wan 2.1 / 2.2 layout) and loaded by
``load_wan_vae`` from the files. diffusers streams (frame 0, then 4 frames per encoder call; one latent frame per
decoder call); jaxvc's results must equal its output whether it runs the rest of the video at once or in scan chunks.
Cases: Wan 2.1, Wan 2.2 (residual levels, 2x2 patchify, wider decoder) and the
3-level ``tiny`` size of jaxvc's tiny configs.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxvc.convert.state_dict import WeightFileError  # noqa: E402
from jaxvc.convert.wan_vae import load_wan_vae  # noqa: E402
from jaxvc.models.unet import UnsupportedConfigError  # noqa: E402
from jaxvc.models.wan_vae import (AutoencoderKLWan, WanVAEConfig, decode_wan, decode_wan_video,  # noqa: E402
                                  encode_wan, encode_wan_video)

PARITY = 1e-5
# name: (diffusers kwargs, video (frames, height, width))
CASES = {
    "wan21": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2,
                   latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]), (9, 16, 24)),
    "wan22": (dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                   latents_mean=[0.0] * 4, latents_std=[1.0] * 4), (9, 32, 16)),
    "tiny": (dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                  scale_factor_spatial=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4), (13, 8, 12)),
}


def randomize_(module, std=0.15, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if name.endswith("gamma") else noise)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (torch model, jaxvc config, params), each loaded from its save_pretrained folder."""
    built = {}
    for seed, (name, (kwargs, _)) in enumerate(CASES.items()):
        model = randomize_(diffusers.AutoencoderKLWan(**kwargs), seed=seed).eval()
        folder = tmp_path_factory.mktemp(f"wan_vae_{name}")
        model.save_pretrained(folder)
        config, params = load_wan_vae(folder)
        built[name] = (model, config, params, folder)
    return built


def video_for(name, seed=0, frames=None):
    f, h, w = CASES[name][1]
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (2, frames or f, h, w, 3)).astype(np.float32)


def to_torch(x):  # (B, T, H, W, C) -> (B, C, T, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def from_torch(x):
    return np.moveaxis(x.detach().numpy(), 1, -1)


def torch_encode(model, video):
    with torch.no_grad():
        dist = model.encode(to_torch(video)).latent_dist
    return from_torch(dist.mean), from_torch(dist.logvar)


def torch_decode(model, latents):
    with torch.no_grad():
        return from_torch(model.decode(to_torch(latents)).sample)


@pytest.mark.parametrize("name", list(CASES))
def test_encode_matches_diffusers_whole_and_chunked(models, name):
    model, config, params, _ = models[name]
    vae = AutoencoderKLWan(config)
    video = video_for(name)
    want_mean, want_logvar = torch_encode(model, video)
    assert want_mean.shape[1] == 1 + (video.shape[1] - 1) // 4
    for chunk in (None, 4, 8):  # 8: a scan over whole chunks and a last shorter one for 13 frames
        mean, logvar = jax.jit(lambda p, v: encode_wan(vae, p, v, chunk_frames=chunk))(params, video)
        errors = relative_error(np.asarray(mean), want_mean), relative_error(np.asarray(logvar), want_logvar)
        print(f"{name} encode chunk={chunk}: mean {errors[0]:.2e} logvar {errors[1]:.2e}")
        assert max(errors) < PARITY, (chunk, errors)


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_diffusers_whole_and_chunked(models, name):
    model, config, params, _ = models[name]
    vae = AutoencoderKLWan(config)
    f, h, w = CASES[name][1]
    factor = config.downsample_factor
    latents = np.random.default_rng(1).standard_normal(
        (2, 1 + (f - 1) // 4, h // factor, w // factor, config.z_dim)).astype(np.float32)
    want = torch_decode(model, latents)
    assert want.shape == (2, f, h, w, 3)
    assert np.mean(np.abs(want) < 0.999) > 0.5  # mostly inside the clamp, so the comparison sees the network
    for chunk in (None, 1, 2):
        got = np.asarray(jax.jit(lambda p, z: decode_wan(vae, p, z, chunk_frames=chunk))(params, latents))
        error = relative_error(got, want)
        print(f"{name} decode chunk={chunk}: {error:.2e}")
        assert error < PARITY, (chunk, error)


def test_single_frame_is_an_image_and_latents_are_normalized_like_wan_pipelines(models):
    model, config, params, _ = models["wan21"]
    vae = AutoencoderKLWan(config)
    image = video_for("wan21", seed=3, frames=1)
    want_mean, _ = torch_encode(model, image)
    latents = np.asarray(encode_wan_video(vae, params, image))
    mean = np.asarray(config.latents_mean, np.float32)
    std = np.asarray(config.latents_std, np.float32)
    # WanImageToVideoPipeline: (latent - latents_mean) * (1 / latents_std)
    assert relative_error(latents, (want_mean - mean) / std) < PARITY
    # WanPipeline decodes latents / (1 / latents_std) + latents_mean
    want_image = torch_decode(model, latents * std + mean)
    assert relative_error(np.asarray(decode_wan_video(vae, params, latents)), want_image) < PARITY


def test_original_wan21_layout_loads_like_the_diffusers_folder(models, tmp_path):
    """The original file's keys, made by inverting diffusers' own single-file converter (checked to round-trip)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.numpy import save_file

    kwargs = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, latents_mean=[0.0] * 4,
                  latents_std=[1.0] * 4)
    model = randomize_(diffusers.AutoencoderKLWan(**kwargs), seed=7).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    original = {}
    for key, value in state.items():
        new = key.replace("quant_conv.", "conv1.") if key.startswith("quant_conv.") else key
        new = new.replace("post_quant_conv.", "conv2.") if key.startswith("post_quant_conv.") else new
        for a, b in ((".conv_in.", ".conv1."), (".norm_out.", ".head.0."), (".conv_out.", ".head.2."),
                     (".mid_block.resnets.0.", ".middle.0."), (".mid_block.attentions.0.", ".middle.1."),
                     (".mid_block.resnets.1.", ".middle.2."), ("encoder.down_blocks.", "encoder.downsamples.")):
            new = new.replace(a, b)
        if new.startswith("decoder.up_blocks."):
            parts = new.split(".")
            level = int(parts[2])
            if parts[3] == "resnets":
                new = ".".join(["decoder", "upsamples", str(4 * level + int(parts[4]))] + parts[5:])
            else:  # upsamplers.0.*
                new = ".".join(["decoder", "upsamples", str(4 * level + 3)] + parts[5:])
        for a, b in ((".norm1.", ".residual.0."), (".conv1.", ".residual.2."), (".norm2.", ".residual.3."),
                     (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")):
            if not new.startswith(("conv1.", "conv2.", "encoder.conv1.", "decoder.conv1.")):
                new = new.replace(a, b)
        original[new] = value
    round_trip = convert_wan_vae_to_diffusers({k: torch.from_numpy(v) for k, v in original.items()})
    assert sorted(round_trip) == sorted(state)
    path = tmp_path / "Wan2.1_VAE.safetensors"
    save_file(original, str(path))
    config, params = load_wan_vae(path)
    assert (config.base_dim, config.dim_mult, config.num_res_blocks, config.temperal_downsample) == (
        4, (1, 2, 4, 4), 2, (False, True, True))
    video = video_for("wan21", seed=5, frames=5)
    mean, _ = encode_wan(AutoencoderKLWan(config), params, video)
    assert relative_error(np.asarray(mean), torch_encode(model, video)[0]) < PARITY


_RESIDUAL_LEAVES = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                    "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                    "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                    "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}


def convert_vae_22_key(key):
    """diffusers' scripts/convert_wan_to_diffusers.py ``convert_vae_22`` (commit 7d56827) on one original key,
    transcribed: fixed tables for the quant convs, input convs, heads and mid blocks, rules for the levels."""
    fixed = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
             "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
    for side in ("encoder", "decoder"):
        fixed.update({f"{side}.conv1.{leaf}": f"{side}.conv_in.{leaf}" for leaf in ("weight", "bias")})
        fixed.update({f"{side}.head.0.gamma": f"{side}.norm_out.gamma",
                      f"{side}.head.2.weight": f"{side}.conv_out.weight",
                      f"{side}.head.2.bias": f"{side}.conv_out.bias"})
        for index, resnet in (("0", "0"), ("2", "1")):
            fixed.update({f"{side}.middle.{index}.{old}": f"{side}.mid_block.resnets.{resnet}.{new}"
                          for old, new in _RESIDUAL_LEAVES.items() if "shortcut" not in old})
        fixed.update({f"{side}.middle.1.{leaf}": f"{side}.mid_block.attentions.0.{leaf}"
                      for leaf in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")})
    if key in fixed:
        return fixed[key]
    for side, nested, resampler in (("encoder", "downsamples", "downsampler"), ("decoder", "upsamples", "upsampler")):
        if not key.startswith(f"{side}.{nested}."):
            continue
        new = key.replace(f"{side}.{nested}.", f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.")
        if "residual" in new or "shortcut" in new:
            new = new.replace(f".{nested}.", ".resnets.")
            old = next((old for old in _RESIDUAL_LEAVES if f".{old}" in new), None)
            return new.replace(f".{old}", f".{_RESIDUAL_LEAVES[old]}") if old else new
        if "resample" in new or "time_conv" in new:
            parts = new.split(".")
            return ".".join(parts[:3] + [resampler] + parts[5:]) if parts[3] == nested else new
        return new
    return key


def wan22_original_key(key, num_res_blocks):
    """diffusers key -> the original Wan 2.2 key (wan/modules/vae2_2.py's module names), written independently of
    jaxvc: a level's Sequential holds its residual blocks and, last, its Resample (encoder: num_res_blocks residual
    blocks; decoder: num_res_blocks + 1)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return ".".join([{"quant_conv": "conv1", "post_quant_conv": "conv2"}[parts[0]]] + parts[1:])
    side, rest = parts[0], parts[1:]
    if "resnets" in rest:  # a residual block's layers by their place in its nn.Sequential
        leaf = ".".join(rest[-2:])
        rest = rest[:-2] + {new: old for old, new in _RESIDUAL_LEAVES.items()}[leaf].split(".")
    head = {"conv_in": ["conv1"], "norm_out": ["head", "0"], "conv_out": ["head", "2"]}
    if rest[0] in head:
        return ".".join([side] + head[rest[0]] + rest[1:])
    if rest[0] == "mid_block":
        index = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[tuple(rest[1:3])]
        return ".".join([side, "middle", index] + rest[3:])
    nested = "downsamples" if side == "encoder" else "upsamples"
    level, block = rest[1], rest[2]
    if block == "resnets":
        return ".".join([side, nested, level, nested, rest[3]] + rest[4:])
    resampler_index = num_res_blocks if side == "encoder" else num_res_blocks + 1
    return ".".join([side, nested, level, nested, str(resampler_index)] + rest[3:])


def test_original_wan22_layout_loads_like_the_diffusers_folder(models, tmp_path):
    """The original Wan2.2_VAE.pth layout, made by inverting diffusers' convert_vae_22 (checked to round-trip
    through its transcription): the same parameters, bit for bit, as from the save_pretrained folder, and
    diffusers' encode/decode."""
    from safetensors.numpy import save_file

    from jaxvc.convert.wan_vae_original import load_original_state_dict
    from jaxvc.models.wan_vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    model, folder_config, folder_params, _ = models["wan22"]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    num_res_blocks = folder_config.num_res_blocks
    original = {wan22_original_key(key, num_res_blocks): value for key, value in state.items()}
    assert len(original) == len(state)
    assert all(convert_vae_22_key(wan22_original_key(key, num_res_blocks)) == key for key in state)
    # vae2_2.py's names: a level's resampler after its residual blocks, the shortcut of a widening block
    expected = ("encoder.downsamples.1.downsamples.1.time_conv.weight",
                "encoder.downsamples.0.downsamples.1.resample.1.bias",
                "decoder.upsamples.0.upsamples.2.resample.1.weight",
                "decoder.upsamples.3.upsamples.0.shortcut.weight",
                "encoder.middle.1.to_qkv.weight", "decoder.head.2.weight", "conv2.bias")
    assert set(expected) <= set(original), set(expected) - set(original)
    path = tmp_path / "Wan2.2_VAE.safetensors"
    save_file(original, str(path))
    config, params = load_wan_vae(path)
    assert config.latents_mean is None  # 4 channels: no released statistics
    assert config == dataclasses.replace(folder_config, latents_mean=None, latents_std=None)
    flat, structure = jax.tree.flatten_with_path(params)
    folder_flat, folder_structure = jax.tree.flatten_with_path(folder_params)
    assert structure == folder_structure
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(flat, folder_flat))

    vae = AutoencoderKLWan(config)
    video = video_for("wan22", seed=6)
    want_mean, want_logvar = torch_encode(model, video)
    mean, logvar = jax.jit(lambda p, v: encode_wan(vae, p, v))(params, video)
    latents = np.random.default_rng(7).standard_normal(want_mean.shape).astype(np.float32)
    want_video = torch_decode(model, latents)
    assert np.mean(np.abs(want_video) < 0.999) > 0.5  # mostly inside the clamp
    got_video = np.asarray(jax.jit(lambda p, z: decode_wan(vae, p, z))(params, latents))
    for what, got, want in (("mean", mean, want_mean), ("logvar", logvar, want_logvar),
                            ("video", got_video, want_video)):
        got = np.asarray(got)
        print(f"wan22 original {what}: max abs {np.max(np.abs(got - want)):.2e} relative "
              f"{relative_error(got, want):.2e}")
        assert relative_error(got, want) < PARITY, what

    # the released size (Wan2.2-TI2V-5B: 2 residual blocks per level, 48 channels) from shapes alone: a diffusers key
    # for every weight, its config, and the latent statistics the original file lacks
    with torch.device("meta"):
        released = diffusers.AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                              in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    shapes = {key: tuple(value.shape) for key, value in released.state_dict().items()}
    zeros = {wan22_original_key(key, 2): np.broadcast_to(np.float32(0), shape) for key, shape in shapes.items()}
    released_config, renamed = load_original_state_dict(zeros, source="Wan2.2_VAE.pth")
    assert sorted(renamed) == sorted(shapes)
    assert released_config == WanVAEConfig.variant("wan22")  # the size entry carries the statistics too
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == 48
    # spot checks against diffusers' vae22_diffusers_config (the same values as Wan2.2's vae2_2.py)
    assert (WAN22_LATENTS_MEAN[0], WAN22_LATENTS_MEAN[19], WAN22_LATENTS_MEAN[47]) == (-0.2289, 0.5109, -0.0667)
    assert (WAN22_LATENTS_STD[0], WAN22_LATENTS_STD[39], WAN22_LATENTS_STD[47]) == (0.4765, 1.6887, 0.7744)

    # a weight missing from an otherwise complete file is named
    from jaxvc.convert.torch_to_flax import CheckpointMismatchError

    broken = {k: v for k, v in original.items() if k != "encoder.downsamples.1.downsamples.0.residual.3.gamma"}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="down_blocks_1/resnets_0/norm2/gamma"):
        load_wan_vae(tmp_path / "broken.safetensors")


def test_bad_inputs_and_configs_get_clear_errors(models, tmp_path):
    _, config, params, folder = models["tiny"]
    vae = AutoencoderKLWan(config)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames.*got 8"):
        encode_wan(vae, params, jnp.zeros((1, 8, 8, 8, 3)))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        encode_wan(vae, params, jnp.zeros((1, 5, 6, 8, 3)))
    with pytest.raises(ValueError, match="not a positive multiple of 4"):
        encode_wan(vae, params, jnp.zeros((1, 9, 8, 8, 3)), chunk_frames=2)
    with pytest.raises(ValueError, match=r"latents must be \(B, T, h, w, 4\)"):
        decode_wan(vae, params, jnp.zeros((1, 2, 2, 2, 16)))
    with pytest.raises(ValueError, match="latents_mean/latents_std are unknown"):
        decode_wan_video(vae.__class__(dataclasses.replace(config, latents_mean=None, latents_std=None)),
                         params, jnp.zeros((1, 1, 2, 2, 4)))
    with pytest.raises(UnsupportedConfigError, match="scale_factor_spatial=8 disagrees"):
        from jaxvc.convert.wan_vae import config_from_diffusers
        config_from_diffusers({"_class_name": "AutoencoderKLWan", "dim_mult": [1, 2, 2],
                               "temperal_downsample": [True, True], "scale_factor_spatial": 8})
    with pytest.raises(WeightFileError, match=r"'encoder.conv_in.weight' .* missing; not a Wan 2.2 VAE checkpoint"):
        from safetensors.numpy import save_file
        save_file({"encoder.downsamples.0.downsamples.0.residual.0.gamma": np.ones((4, 1, 1, 1), np.float32)},
                  str(tmp_path / "wan22.safetensors"))
        load_wan_vae(tmp_path / "wan22.safetensors")
    assert WanVAEConfig.variant("wan21").latent_frames(81) == 21


def test_spatial_tiles_match_diffusers_tiling(models):
    """diffusers' enable_tiling at small tiles against jaxvc's tiled encode and decode, on Wan 2.2 (tiles overlap in
    both directions, cut and blended in patchified pixels; without a patch the same code divides by 1)."""
    name, tile, stride, size = "wan22", 32, 16, (64, 48)
    from jaxvc.models.wan_vae_tiling import decode_wan_tiled, encode_wan_tiled

    model, config, params, _ = models[name]
    vae = AutoencoderKLWan(config)
    video = np.random.default_rng(4).uniform(-1, 1, (1, 5, *size, 3)).astype(np.float32)
    model.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_sample_stride_height=stride,
                        tile_sample_stride_width=stride)
    try:
        want_mean, want_logvar = torch_encode(model, video)
        latents = np.random.default_rng(5).standard_normal(want_mean.shape).astype(np.float32)
        want_video = torch_decode(model, latents)
    finally:
        model.disable_tiling()
    mean, logvar = encode_wan_tiled(vae, params, video, tile=tile, stride=stride, jit_tiles=True)
    assert relative_error(np.asarray(mean), want_mean) < PARITY
    assert relative_error(np.asarray(logvar), want_logvar) < PARITY
    got = jax.jit(lambda p, z: decode_wan_tiled(vae, p, z, tile=tile, stride=stride))(params, latents)
    assert relative_error(np.asarray(got), want_video) < PARITY
    untiled = np.asarray(jax.jit(lambda p, z: decode_wan(vae, p, z))(params, latents))
    assert relative_error(np.asarray(got), untiled) > 1e-3  # the tiles really differ from one whole-frame pass
