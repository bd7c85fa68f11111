"""jaxvc WanTransformer3D + convert/wan.py against diffusers 0.42.1 WanTransformer3DModel (float32, random weights).

Each torch model is saved with ``save_pretrained`` (or rewritten in the original Wan layout) and loaded through
``jaxvc.convert.wan.load_wan`` from the files, so these tests prove the loader as much as the model. The configs
cover text-to-video (Wan 2.1 T2V), per-token timesteps (Wan 2.2 TI2V), CLIP image tokens (Wan 2.1 I2V), FLF2V's
image position table, temporal patches, an uneven RoPE split and no cross-attention norm.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import save_file  # noqa: E402

from jaxvc.convert.torch_to_flax import CheckpointMismatchError  # noqa: E402
from jaxvc.convert.wan import load_wan  # noqa: E402
from jaxvc.models.unet import UnsupportedConfigError  # noqa: E402
from jaxvc.models.wan import WanTransformer3D  # noqa: E402

PARITY = 1e-5
BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=20, freq_dim=16, ffn_dim=40, num_layers=2)
# name: (diffusers kwargs, latent (F, H, W), text tokens, image tokens per video or None, per-token timesteps)
CASES = {
    "t2v": (dict(), (3, 4, 6), 7, None, False),
    "ti2v_per_token": (dict(in_channels=6, out_channels=6), (3, 4, 6), 7, None, True),
    # diffusers splits the cross-attention context assuming exactly 512 text tokens
    "i2v": (dict(in_channels=8, image_dim=10, added_kv_proj_dim=24), (2, 4, 4), 512, 5, False),
    "flf2v": (dict(image_dim=10, added_kv_proj_dim=24, pos_embed_seq_len=6), (2, 4, 4), 512, 6, False),
    "odd": (dict(patch_size=(2, 2, 2), attention_head_dim=16, cross_attn_norm=False, out_channels=3),
            (4, 4, 2), 5, None, False),
}


def randomize_(module, std=0.1, seed=0):
    """Normal weights everywhere (zeros and ones hide bugs); norm scales around 1 to keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_scale = param.ndim == 1 and name.endswith("weight") and "norm" in name
            param.copy_(1.0 + noise if is_norm_scale else noise)
    return module


def inputs(name, seed=0):
    kwargs, (frames, height, width), text_len, image_len, per_token = CASES[name]
    config = {**BASE, **kwargs}
    rng = np.random.default_rng(seed)
    batch = 2
    latents = rng.standard_normal((batch, frames, height, width, config["in_channels"])).astype(np.float32)
    text = rng.standard_normal((batch, text_len, config["text_dim"])).astype(np.float32)
    image = None if image_len is None else rng.standard_normal((batch, image_len, 10)).astype(np.float32)
    if per_token:
        p_t, p_h, p_w = config["patch_size"]
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        timesteps = rng.uniform(0, 1000, (batch, tokens)).astype(np.float32)
        timesteps[:, : (height // p_h) * (width // p_w)] = 0.0  # a clean first frame, as TI2V does
    else:
        timesteps = np.array([999.0, 321.5], np.float32)
    return latents, timesteps, text, image


def torch_forward(model, latents, timesteps, text, image):
    image_torch = None
    if image is not None:
        # FLF2V: diffusers takes (2B, S, D) (first and last frame per video) and views it as (B, 2S, D)
        seq = model.config.pos_embed_seq_len
        image_torch = torch.from_numpy(image if seq is None else image.reshape(-1, seq // 2, image.shape[-1]))
    with torch.no_grad():
        out = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timesteps),
                    torch.from_numpy(text), encoder_hidden_states_image=image_torch, return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (torch model, folder)} saved with diffusers' save_pretrained."""
    out = {}
    for index, name in enumerate(CASES):
        model = randomize_(diffusers.WanTransformer3DModel(**{**BASE, **CASES[name][0]}).eval(), seed=index)
        folder = tmp_path_factory.mktemp(f"wan_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def jax_forward(config, variables, latents, timesteps, text, image):
    return np.asarray(jax.jit(lambda v, *a: WanTransformer3D(config).apply(v, *a))(variables, latents, timesteps,
                                                                                    text, image))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(saved, name):
    model, folder = saved[name]
    config, variables = load_wan(folder)
    args = inputs(name)
    reference = torch_forward(model, *args)
    ours = jax_forward(config, variables, *args)
    assert ours.shape == args[0].shape[:4] + (model.config.out_channels,)
    assert relative_error(ours, reference) < PARITY


def to_original_layout(state_dict):
    """diffusers keys -> the original Wan names (the inverse of diffusers' single-file converter)."""
    renames = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
               ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
               ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
               ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
               ("condition_embedder.time_proj", "time_projection.1"),
               ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
               ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
               ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
               ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
               (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."),
               (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."),
               (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."), ("ffn.net.0.proj", "ffn.0"),
               ("ffn.net.2", "ffn.2"), (".norm2.", ".norm_x."), (".norm3.", ".norm2."), (".norm_x.", ".norm3.")]
    out = {}
    for key, value in state_dict.items():
        new = {"scale_shift_table": "head.modulation", "proj_out.weight": "head.head.weight",
               "proj_out.bias": "head.head.bias"}.get(key, key)
        for old, replacement in renames:
            new = new.replace(old, replacement)
        new = new.replace(".scale_shift_table", ".modulation")
        out["model.diffusion_model." + new] = value.detach().numpy().copy()
    return out


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_original_layout_file(saved, name, tmp_path):
    """A single file in the original Wan layout (no config) loads with the sizes read from its shapes."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model, _ = saved[name]
    original = to_original_layout(model.state_dict())
    # the renaming used here is the one diffusers' own single-file loader undoes
    assert set(convert_wan_transformer_to_diffusers(dict(original))) == set(model.state_dict())
    path = tmp_path / "wan.safetensors"
    save_file(original, str(path))
    config, variables = load_wan(path, attention_head_dim=12)
    assert (config.num_layers, config.num_attention_heads, config.ffn_dim) == (2, 2, 40)
    args = inputs(name)
    assert relative_error(jax_forward(config, variables, *args), torch_forward(model, *args)) < PARITY


def test_intermediates_and_fused_projections(saved, tmp_path):
    """Fused q/k/v weights (``fuse_projections``) load as the separate ones; intermediates are the block outputs."""
    model, folder = saved["t2v"]
    config, variables = load_wan(folder)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for block in range(2):
        prefix = f"blocks.{block}.attn1."
        for leaf in ("weight", "bias"):
            state[f"{prefix}to_qkv.{leaf}"] = np.concatenate([state.pop(f"{prefix}to_{n}.{leaf}") for n in "qkv"])
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(state, str(fused / "diffusion_pytorch_model.safetensors"))
    (fused / "config.json").write_text((folder / "config.json").read_text())
    _, fused_variables = load_wan(fused)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, fused_variables))

    args = inputs("t2v")
    out, intermediates = WanTransformer3D(config).apply(variables, *args, return_intermediates=True)
    assert sorted(intermediates) == ["blocks_0", "blocks_1"]
    assert intermediates["blocks_1"].shape == (2, 3 * 2 * 3, config.inner_dim)
    captured = {}
    # a hook that returns None leaves the output alone; removed, so the shared model stays as it was
    hook = model.blocks[1].register_forward_hook(lambda module, a, output: captured.update(out=output))
    torch_forward(model, *args)
    hook.remove()
    assert relative_error(intermediates["blocks_1"], captured["out"].numpy()) < PARITY


def test_frame_offset_moves_rope_only_along_frames(saved):
    """Shifting every frame's RoPE position by the same offset changes nothing: attention sees offsets only."""
    model, folder = saved["t2v"]
    config, variables = load_wan(folder)
    args = inputs("t2v")
    plain = WanTransformer3D(config).apply(variables, *args)
    shifted = WanTransformer3D(config).apply(variables, *args, frame_offset=5)
    assert relative_error(shifted, plain) < 1e-5
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        WanTransformer3D(config).apply(variables, *args, frame_offset=1022)


def test_loader_errors(saved, tmp_path):
    model, folder = saved["t2v"]
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    state["blocks.0.attn1.to_q.weight"] = state["blocks.0.attn1.to_q.weight"][:, :-1]
    del state["proj_out.bias"]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError, match=r"proj_out/bias[\s\S]*blocks\.0\.attn1\.to_q\.weight"):
        load_wan(broken)
    config = json.loads((folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "qk_norm": "rms_norm"}))
    with pytest.raises(UnsupportedConfigError, match="qk_norm"):
        load_wan(broken)
    config_, variables = load_wan(folder)
    latents, timesteps, text, _ = inputs("t2v")
    with pytest.raises(ValueError, match="in_channels=4"):
        WanTransformer3D(config_).apply(variables, latents[..., :3], timesteps, text)
    with pytest.raises(ValueError, match=r"timesteps of shape \(3,\)"):
        WanTransformer3D(config_).apply(variables, latents, jnp.zeros(3), text)


def test_reference_stream_is_a_frame_zero_prepended_and_masking_removes_it(saved):
    """The reference's tokens at RoPE frame 0 before the video's (frames 1..F): without a time delta that is the
    model on [reference; video] with the first frame's output dropped; masked out, it is the plain model."""
    _, folder = saved["t2v"]
    config, variables = load_wan(folder)
    latents, timesteps, text, _ = inputs("t2v")
    reference = np.random.default_rng(5).standard_normal(latents[:, :1].shape).astype(np.float32)
    model = WanTransformer3D(config)
    joined = model.apply(variables, np.concatenate([reference, latents], axis=1), timesteps, text)[:, 1:]
    streamed = model.apply(variables, latents, timesteps, text, reference_latent=reference)
    assert relative_error(streamed, joined) < 1e-5
    dropped = model.apply(variables, latents, timesteps, text, reference_latent=reference,
                          reference_mask=np.zeros((2, 6), bool))
    assert relative_error(dropped, model.apply(variables, latents, timesteps, text)) < 1e-5
    delta = model.apply(variables, latents, timesteps, text, reference_latent=reference,
                        reference_time_delta=lambda silu_temb: 0.1 * jnp.ones((2, 6 * config.inner_dim)))
    assert relative_error(delta, streamed) > 1e-3  # the reference's own modulation reaches the video
    with pytest.raises(ValueError, match="per token"):
        model.apply(variables, latents, np.zeros((2, 18), np.float32), text, reference_latent=reference)


def test_lora_written_by_jaxvc_loads_in_diffusers_and_reads_back(saved, tmp_path):
    """The disentangled S2V method's LoRA (attention, patch conv, text projection, ffn.net.2) on the Wan DiT, written
    by ``save_lora``: diffusers' ``load_lora_adapter`` on ``WanTransformer3DModel`` gives jaxvc's output, and
    ``read_lora`` reads the file back to the same factors."""
    import copy

    pytest.importorskip("peft")
    from jaxvc.convert.lora import read_lora, save_lora
    from jaxvc.methods.disentangled_s2v import LORA_TARGETS
    from jaxvc.models import lora

    model, folder = saved["t2v"]
    config, variables = load_wan(folder)
    spec = lora.AdapterSpec(include=LORA_TARGETS, rank=3, alpha=6.0)
    args = inputs("t2v")
    sites = lora.find_sites(lambda: WanTransformer3D(config).init(jax.random.key(0), *args[:3]), spec)
    tree = lora.init_adapter(jax.random.key(1), sites, spec)
    tree = jax.tree.map(lambda v: 0.2 * jax.random.normal(jax.random.key(v.size), v.shape), tree)  # non-zero ups
    path = save_lora(tmp_path / "wan_lora.safetensors", {"transformer": lora.AppliedAdapter(spec, tree)})
    with lora.applied([lora.AppliedAdapter(spec, tree)]):
        ours = np.asarray(WanTransformer3D(config).apply(variables, *args[:3]))
    adapted = copy.deepcopy(model)
    adapted.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="transformer", adapter_name="s2v")
    assert relative_error(ours, torch_forward(adapted, *args)) < PARITY
    assert relative_error(ours, torch_forward(model, *args)) > 1e-3
    loaded = read_lora(path, {"transformer": variables["params"]}).adapters["transformer"]
    written = lora.adapter_sites(tree)
    assert set(lora.adapter_sites(loaded.tree)) == set(written)
    for site, pair in lora.adapter_sites(loaded.tree).items():  # alpha / rank folded into up on reading
        np.testing.assert_allclose(np.asarray(pair["down"]), np.asarray(written[site]["down"]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(pair["up"]), np.asarray(written[site]["up"]) * spec.scaling,
                                   rtol=1e-6)
