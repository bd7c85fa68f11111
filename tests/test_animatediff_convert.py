"""Original-layout AnimateDiff motion-module files (mm_sd_v15_v2-style) -> the same parameters as diffusers folders.

The test builds diffusers ``MotionAdapter``s with random weights, writes them back into the original guoyww layout
(``temporal_transformer.``, ``attention_blocks.{0,1}``, ``norms.{0,1}``, ``ff_norm``, two ``pos_encoder.pe`` copies
per block) as .safetensors and as a torch zip .ckpt, and checks that jaxvc's loader reproduces exactly the
parameters it loads from the diffusers folders, with the right version (v1/v2/v3).
"""
import json
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jaxvc.convert.animatediff import (detect_version, motion_module_from_state_dict,  # noqa: E402
                                       read_motion_module_file)
from jaxvc.convert.state_dict import WeightFileError  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.convert.unet import load_unet  # noqa: E402
from jaxvc.models.unet import UNetMotion, UnsupportedConfigError  # noqa: E402
from tests.conftest import relative_error  # noqa: E402

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SD_TOPOLOGY = dict(sample_size=32, block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=8,
                   cross_attention_dim=32, attention_head_dim=2)
TINY = dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)


def randomize(module, seed, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else std * noise)
    return module


_MODULE_PREFIX = re.compile(r"^((?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.\d+\.)")


def to_original_layout(adapter_state):
    """Inverse of diffusers' converter: diffusers MotionAdapter keys -> guoyww/AnimateDiff keys (pe copied twice)."""
    original = {}
    for key, value in adapter_state.items():
        value = value.detach().clone().contiguous()
        key = _MODULE_PREFIX.sub(r"\1temporal_transformer.", key)
        if key.endswith(".pos_embed.pe"):
            block = key[:-len(".pos_embed.pe")]
            for index in (0, 1):
                original[f"{block}.attention_blocks.{index}.pos_encoder.pe"] = value.clone()
            continue
        for new, old in ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                         (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1.")):
            key = key.replace(new, old)
        original[key] = value
    return original


@pytest.fixture(scope="module")
def sd_v2(tmp_path_factory):
    """SD-topology UNet + v2 adapter (567 diffusers keys, 588 original keys) saved in every layout."""
    folder = tmp_path_factory.mktemp("sd_v2")
    unet2d = randomize(diffusers.UNet2DConditionModel(**SD_TOPOLOGY), 1)
    adapter = randomize(diffusers.MotionAdapter(block_out_channels=(16, 32, 64, 64), motion_layers_per_block=2,
                                                motion_num_attention_heads=2, motion_norm_num_groups=8,
                                                motion_max_seq_length=32, use_motion_mid_block=True), 2)
    unet2d.save_pretrained(folder / "unet")
    adapter.save_pretrained(folder / "adapter")
    original = to_original_layout(adapter.state_dict())
    save_file(original, str(folder / "mm_v2.safetensors"))
    torch.save(original, folder / "mm_v2.ckpt")
    torch.save({"state_dict": original, "global_step": 1}, folder / "mm_v2_wrapped.ckpt")
    return dict(folder=folder, adapter=adapter, original=original)


def assert_same_tree(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_original_layout_loads_like_the_diffusers_folder(sd_v2):
    folder = sd_v2["folder"]
    assert len(sd_v2["adapter"].state_dict()) == 567 and len(sd_v2["original"]) == 588
    reference_config, reference = load_unet(folder / "unet", folder / "adapter")
    for name, kwargs in (("mm_v2.safetensors", {}), ("mm_v2.ckpt", {"allow_pickle": True}),
                         ("mm_v2_wrapped.ckpt", {"allow_pickle": True})):
        config, variables = load_unet(folder / "unet", folder / name, motion_heads=2, **kwargs)
        assert config == reference_config, name
        assert set(variables) == {"params"}  # the stored tables equal the formula: no buffers
        assert_same_tree(variables, reference)
    motion_file = read_motion_module_file(folder / "mm_v2.safetensors")
    assert (motion_file.layout, motion_file.version, motion_file.max_seq_length) == ("original", "v2", 32)
    assert motion_file.use_mid_block and motion_file.has_position_tables


def test_pickle_needs_explicit_permission(sd_v2):
    with pytest.raises(WeightFileError, match="allow_pickle"):
        load_unet(sd_v2["folder"] / "unet", sd_v2["folder"] / "mm_v2.ckpt", motion_heads=2)


@pytest.mark.parametrize("version,mid,max_len", [("v1", False, 24), ("v2", True, 32), ("v3", False, 32)])
def test_version_detection(tmp_path, version, mid, max_len):
    adapter = randomize(diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                                motion_num_attention_heads=4, motion_norm_num_groups=8,
                                                motion_max_seq_length=max_len, use_motion_mid_block=mid), 3)
    original = to_original_layout(adapter.state_dict())
    save_file(original, str(tmp_path / "mm.safetensors"))
    motion_file = read_motion_module_file(tmp_path / "mm.safetensors")
    assert (motion_file.version, motion_file.max_seq_length, motion_file.use_mid_block) == (version, max_len, mid)
    config = motion_file.motion_config(heads=4)
    assert (config.max_seq_length, config.use_mid_block) == (max_len, mid)

    # files whose pe buffers were not persisted: v2 is still recognised; v1 vs v3 needs max_seq_length
    no_tables = {k: v.numpy() for k, v in original.items() if "pos_encoder" not in k}
    if mid:
        assert detect_version(motion_module_from_state_dict(no_tables).state_dict) == ("v2", 32)
    else:
        with pytest.raises(ValueError, match="pass max_seq_length"):
            motion_module_from_state_dict(no_tables, "mm.safetensors")
        assert motion_module_from_state_dict(no_tables, max_seq_length=max_len).version == version

    # the same weights in diffusers layout as one file are read too
    diffusers_layout = {k: v.numpy() for k, v in adapter.state_dict().items()}
    parsed = motion_module_from_state_dict(diffusers_layout)
    assert (parsed.layout, parsed.version) == ("diffusers", version)


def test_unsupported_motion_files_are_named():
    with pytest.raises(UnsupportedConfigError, match="SparseCtrl"):
        detect_version({"controlnet_cond_embedding.conv_in.weight": np.zeros(1)}, "sparsectrl.ckpt")
    with pytest.raises(UnsupportedConfigError, match="SDXL"):
        detect_version({"up_blocks.2.motion_modules.0.norm.weight": np.zeros(320)}, "mm_sdxl.ckpt")
    with pytest.raises(CheckpointMismatchError, match="not an AnimateDiff motion module"):
        motion_module_from_state_dict({"conv_in.weight": np.zeros(1)}, "unet.safetensors")
    table = np.zeros((1, 32, 64), np.float32)
    with pytest.raises(CheckpointMismatchError, match="differ"):
        motion_module_from_state_dict({
            "mid_block.motion_modules.0.temporal_transformer.norm.bias": np.zeros(64),
            "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe":
                table, "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1"
                       ".pos_encoder.pe": table + 1})


def test_mismatched_motion_file_names_the_key(sd_v2, tmp_path):
    broken = dict(sd_v2["original"])
    key = "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v.weight"
    del broken[key]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="up_blocks_3/motion_modules_2/transformer_blocks_0/attn2/to_v"):
        load_unet(sd_v2["folder"] / "unet", tmp_path / "broken.safetensors", motion_heads=2)


def test_stored_positional_tables_that_differ_are_used(tmp_path):
    """A stored pe that is not the formula: warning, kept in variables['buffers'], and the output follows it
    (diffusers' forward with the same modified buffers)."""
    unet2d = randomize(diffusers.UNet2DConditionModel(**TINY), 5).eval()
    adapter = randomize(diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                                motion_num_attention_heads=4, motion_norm_num_groups=8,
                                                motion_max_seq_length=24, use_motion_mid_block=False), 6).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in adapter.named_buffers():
            if name.endswith("pos_embed.pe"):
                buffer.add_(0.5 * torch.randn(buffer.shape, generator=generator))
    model = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    with torch.no_grad():  # from_unet2d loads the adapter's state dict, buffers included
        for (name, mine), (_, theirs) in zip(sorted(adapter.named_buffers()),
                                             sorted((n, b) for n, b in model.named_buffers() if "pos_embed" in n)):
            assert torch.equal(mine, theirs), name
    unet2d.save_pretrained(tmp_path / "unet")
    save_file(to_original_layout(adapter.state_dict()), str(tmp_path / "mm_v1.safetensors"))

    b, f, h, w = 1, 6, 8, 8
    sample = torch.randn(b, 4, f, h, w, generator=generator)
    context = torch.randn(b, 5, 32, generator=generator)
    with torch.no_grad():
        reference = model(sample, torch.tensor([300]), context.repeat_interleave(f, dim=0)).sample.numpy()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, variables = load_unet(tmp_path / "unet", tmp_path / "mm_v1.safetensors", motion_heads=4)
    assert any("differ from the sinusoidal formula" in str(w.message) for w in caught)
    assert config.motion.max_seq_length == 24 and not config.motion.use_mid_block
    assert len(jax.tree.leaves(variables["buffers"])) == 6  # one table per temporal block

    apply = UNetMotion(config).apply
    args = (jnp.asarray(sample.numpy().transpose(0, 2, 3, 4, 1)), jnp.asarray([300]), jnp.asarray(context.numpy()))
    out = jax.jit(apply).lower(variables, *args).compile(FAST_COMPILE)(variables, *args)
    error = relative_error(np.asarray(out).transpose(0, 4, 1, 2, 3), reference)
    print(f"stored positional tables: relative error {error:.2e}")
    assert error < 1e-5
    # and without the buffers the model falls back to the formula, which is a different function here
    out_formula = jax.jit(apply).lower({"params": variables["params"]}, *args).compile(FAST_COMPILE)(
        {"params": variables["params"]}, *args)
    assert relative_error(np.asarray(out_formula).transpose(0, 4, 1, 2, 3), reference) > 1e-3


def test_config_json_of_saved_motion_unet(sd_v2, tmp_path):
    """A saved UNetMotionModel folder (motion modules inside) loads to the same config and parameters."""
    folder = sd_v2["folder"]
    unet2d = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    motion_unet = diffusers.UNetMotionModel.from_unet2d(unet2d, sd_v2["adapter"])
    motion_unet.save_pretrained(tmp_path / "motion_unet")
    assert json.loads((tmp_path / "motion_unet" / "config.json").read_text())["_class_name"] == "UNetMotionModel"
    config, variables = load_unet(tmp_path / "motion_unet")
    reference_config, reference = load_unet(folder / "unet", folder / "adapter")
    assert config == reference_config
    assert_same_tree(variables, reference)
