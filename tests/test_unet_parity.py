"""UNetMotion (jaxvc) against diffusers 0.42.1 UNetMotionModel / UNet2DConditionModel, loaded through jaxvc's loader.

Each case builds random-weight torch models (every weight randomised, AnimateDiff's zero-init proj_out included),
saves them with ``save_pretrained``, loads the folders with ``jaxvc.convert.unet.load_unet`` and compares outputs
(float32, relative error ||ours - ref|| / ||ref|| < 1e-5).
"""
import dataclasses
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jaxvc.convert.state_dict import WeightFileError  # noqa: E402
from jaxvc.convert.torch_to_flax import CheckpointMismatchError, fill_params  # noqa: E402
from jaxvc.convert.unet import abstract_variables, load_unet  # noqa: E402
from jaxvc.models.motion import MotionModule  # noqa: E402
from jaxvc.models.unet import UNetMotion, UnsupportedConfigError, is_motion_param, unet_config  # noqa: E402
from tests.conftest import random_unet_variables, relative_error  # noqa: E402

TOLERANCE = 1e-5
# XLA's CPU backend optimisations cost most of the compile time of these unrolled UNets and change no result that
# matters here (every comparison is against torch at 1e-5).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_jitted(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def randomize(module, seed, std=0.05):
    """Every parameter random: weights/biases N(0, std), norm scales 1 + N(0, 0.1) (zeros hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    return module


def to_video(x):  # torch (B, C, F, H, W) -> ours (B, F, H, W, C)
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1))


def from_video(y):  # ours (B, F, H, W, C) -> torch layout
    return np.asarray(y, np.float32).transpose(0, 4, 1, 2, 3)


# name: (UNet2DConditionModel kwargs, MotionAdapter kwargs or None, (B, F, H, W), context length)
CASES = {
    # (a) PARITY §1a tiny, adapter layout v1 (no mid block, max length 24)
    "tiny_v1": (dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                     layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4),
                dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=4,
                     motion_norm_num_groups=8, motion_max_seq_length=24, use_motion_mid_block=False),
                (2, 8, 16, 16), 7),
    # (b) other sizes: 2 layers per block, per-level heads, 2 spatial and 2 temporal transformer layers, linear
    # projections, 16 groups, adapter layout v3 (no mid, 32), and an odd latent height (upsample to the skip size)
    "wide_v3": (dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                     layers_per_block=2, norm_num_groups=16, cross_attention_dim=24, attention_head_dim=(2, 4),
                     transformer_layers_per_block=2, use_linear_projection=True),
                dict(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=(2, 4),
                     motion_transformer_layers_per_block=2, motion_norm_num_groups=16, motion_max_seq_length=32,
                     use_motion_mid_block=False),
                (1, 5, 9, 12), 5),
    # (c) PARITY §1b: the SD1.5 topology at tiny width (1253 keys), adapter layout v2 (motion mid block)
    "sd_topology_v2": (dict(sample_size=32, block_out_channels=(16, 32, 64, 64), layers_per_block=2,
                            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2),
                       dict(block_out_channels=(16, 32, 64, 64), motion_layers_per_block=2,
                            motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=32,
                            use_motion_mid_block=True),
                       (1, 4, 16, 16), 6),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds each case once: torch model, saved folders, inputs and the reference output."""
    cache = {}

    def build(name):
        if name in cache:
            return cache[name]
        unet_kwargs, adapter_kwargs, (b, f, h, w), length = CASES[name]
        seed = sorted(CASES).index(name)
        unet2d = randomize(diffusers.UNet2DConditionModel(**unet_kwargs), seed).eval()
        adapter = randomize(diffusers.MotionAdapter(**adapter_kwargs), seed + 100).eval()
        model = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter).eval()
        folder = tmp_path_factory.mktemp(name)
        unet2d.save_pretrained(folder / "unet")
        adapter.save_pretrained(folder / "adapter")
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn(b, 4, f, h, w, generator=generator)
        context = torch.randn(b, length, unet_kwargs["cross_attention_dim"], generator=generator)
        timesteps = torch.tensor([10, 900][:b])
        with torch.no_grad():
            reference = model(sample, timesteps, context.repeat_interleave(f, dim=0)).sample.numpy()
        cache[name] = dict(unet2d=unet2d, adapter=adapter, model=model, folder=folder, sample=sample,
                           context=context, timesteps=timesteps, reference=reference)
        return cache[name]

    return build


def intermediate_hooks(model, store):
    def hook(name):
        def save(_, __, output):
            store[name] = (output[0] if isinstance(output, tuple) else output).detach().numpy()
        return save
    handles = [block.register_forward_hook(hook(f"down_blocks_{i}")) for i, block in enumerate(model.down_blocks)]
    handles += [block.register_forward_hook(hook(f"up_blocks_{i}")) for i, block in enumerate(model.up_blocks)]
    handles.append(model.mid_block.register_forward_hook(hook("mid_block")))
    return handles


@pytest.mark.parametrize("name", sorted(CASES))
def test_unet_motion_matches_diffusers(built, name):
    case = built(name)
    config, variables = load_unet(case["folder"] / "unet", case["folder"] / "adapter")
    assert config.motion is not None
    assert config.motion.use_mid_block == CASES[name][1]["use_motion_mid_block"]
    assert config.motion.max_seq_length == CASES[name][1]["motion_max_seq_length"]
    num_params = len(jax.tree.leaves(variables["params"]))
    num_tensors = len([k for k in case["model"].state_dict() if not k.endswith("pos_embed.pe")])
    assert num_params == num_tensors
    if name == "sd_topology_v2":
        assert len(case["model"].state_dict()) == 1253  # same key names/count as SD1.5 + mm_sd_v15_v2

    model = UNetMotion(config)
    apply = functools.partial(model.apply, return_intermediates=True)
    out, intermediates = run_jitted(apply, variables, to_video(case["sample"]), jnp.asarray(case["timesteps"]),
                                    jnp.asarray(case["context"].numpy()))
    error = relative_error(from_video(out), case["reference"])
    print(f"{name}: relative error {error:.2e}")
    assert error < TOLERANCE

    # block outputs too (torch (B*F, C, h, w) -> ours (B, F, h, w, C))
    store = {}
    handles = intermediate_hooks(case["model"], store)
    with torch.no_grad():
        f = case["sample"].shape[2]
        case["model"](case["sample"], case["timesteps"], case["context"].repeat_interleave(f, dim=0))
    for handle in handles:
        handle.remove()
    for key, ref in store.items():
        ours = np.asarray(intermediates[key]).reshape(-1, *intermediates[key].shape[2:]).transpose(0, 3, 1, 2)
        assert relative_error(ours, ref) < TOLERANCE, key


def test_plain_unet2d_matches_diffusers(built):
    """motion=None is UNet2DConditionModel applied to every frame (frames folded into the batch)."""
    case = built("tiny_v1")
    config, variables = load_unet(case["folder"] / "unet")
    assert config.motion is None
    b, _, f, h, w = case["sample"].shape
    images = case["sample"].permute(0, 2, 1, 3, 4).reshape(b * f, 4, h, w)
    with torch.no_grad():
        reference = case["unet2d"](images, case["timesteps"].repeat_interleave(f),
                                   case["context"].repeat_interleave(f, dim=0)).sample.numpy()
    out = run_jitted(UNetMotion(config).apply, variables, to_video(case["sample"]), jnp.asarray(case["timesteps"]),
                     jnp.asarray(case["context"].numpy()))
    ours = np.asarray(out).reshape(b * f, h, w, 4).transpose(0, 3, 1, 2)
    error = relative_error(ours, reference)
    print(f"plain UNet2D: relative error {error:.2e}")
    assert error < TOLERANCE



@pytest.mark.parametrize("options", [dict(resnet_time_scale_shift="scale_shift"),
                                     dict(addition_embed_type="text", addition_embed_type_num_heads=4)],
                         ids=["scale_shift", "text_time_embedding"])
def test_time_conditioning_options_match_diffusers(tmp_path, options):
    """resnet_time_scale_shift="scale_shift": each resnet's time_emb_proj gives 2C outputs (scale, shift) that
    modulate norm2 (FiLM). addition_embed_type="text": the attention-pooled text tokens are added to the timestep
    embedding. Against diffusers' UNet2DConditionModel with the same option."""
    torch_unet = randomize(diffusers.UNet2DConditionModel(**CASES["tiny_v1"][0], **options), seed=7).eval()
    torch_unet.save_pretrained(tmp_path / "unet")
    config, variables = load_unet(tmp_path / "unet")
    for key, value in options.items():
        assert getattr(config, key) == value
    if "resnet_time_scale_shift" in options:
        assert variables["params"]["mid_block"]["resnets_0"]["time_emb_proj"]["kernel"].shape == (128, 2 * 64)
    else:
        assert variables["params"]["add_embedding"]["pool"]["positional_embedding"].shape == (1, 32)
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, 3, 8, 8, generator=generator)  # (B, C, F, H, W)
    context = torch.randn(2, 5, 32, generator=generator)
    timesteps = torch.tensor([10, 900])
    images = sample.permute(0, 2, 1, 3, 4).reshape(6, 4, 8, 8)
    with torch.no_grad():
        reference = torch_unet(images, timesteps.repeat_interleave(3), context.repeat_interleave(3, dim=0)).sample
    out = run_jitted(UNetMotion(config).apply, variables, to_video(sample), jnp.asarray(timesteps),
                     jnp.asarray(context.numpy()))
    ours = np.asarray(out).reshape(6, 8, 8, 4).transpose(0, 3, 1, 2)
    error = relative_error(ours, reference.numpy())
    print(f"{options}: relative error {error:.2e}")
    assert error < TOLERANCE


def test_frame_time_embedding_tells_each_frame_its_index():
    """MotionConfig.frame_time_embedding adds an embedding of the frame index to each frame's timestep embedding.
    With the motion modules made identity (proj_out zero, as AnimateDiff initialises them), a video of one repeated
    frame gives identical output frames without it, different ones with it, and the same output as without it once
    the frame embedding's last layer is zero."""
    base = unet_config("tiny", motion="v1", block_out_channels=(32,), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    with_frames = dataclasses.replace(base, motion=dataclasses.replace(base.motion, frame_time_embedding=True))
    params = random_unet_variables(with_frames)["params"]
    flat = flax.traverse_util.flatten_dict(params)
    flat = {k: (jnp.zeros_like(v) if is_motion_param(k) and "proj_out" in k else v) for k, v in flat.items()}
    params = flax.traverse_util.unflatten_dict(flat)
    plain_params = {k: v for k, v in params.items() if k != "frame_embedding"}
    rng = np.random.default_rng(3)
    frame = rng.standard_normal((1, 1, 8, 8, 4)).astype(np.float32)
    video = jnp.asarray(np.repeat(frame, 3, axis=1))  # (1, 3, 8, 8, 4): one frame, three times
    context = jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)

    def run(config, p):
        return np.asarray(run_jitted(UNetMotion(config).apply, {"params": p}, video, jnp.asarray([500]), context))

    plain = run(base, plain_params)
    np.testing.assert_allclose(plain[0, 1:], np.broadcast_to(plain[0, :1], plain[0, 1:].shape), rtol=0, atol=1e-6)
    framed = run(with_frames, params)
    assert np.abs(framed[0, 1:] - framed[0, :1]).mean() > 1e-2 * np.abs(framed).mean()
    silent = dict(params, frame_embedding={"linear_1": params["frame_embedding"]["linear_1"],
                                           "linear_2": jax.tree.map(jnp.zeros_like,
                                                                    params["frame_embedding"]["linear_2"])})
    np.testing.assert_allclose(run(with_frames, silent), plain, rtol=0, atol=1e-6)


def checkpoint_policies(closed_jaxpr) -> list:
    """The ``policy`` of every checkpoint (remat) equation in a jaxpr, nested ones included (read from the equations,
    not the printed jaxpr, whose spelling of a policy changed between jax 0.10 and 0.12)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if "policy" in eqn.params and eqn.primitive.name in ("remat2", "checkpoint"):
                found.append(eqn.params["policy"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)
    walk(closed_jaxpr.jaxpr)
    return found


def test_remat_and_bfloat16():
    """remat=True gives the same loss and gradients (and really checkpoints); bfloat16 compute stays close."""
    config = unet_config("tiny", motion="v2", block_out_channels=(32,), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    variables = random_unet_variables(config)
    rng = np.random.default_rng(1)
    sample = jnp.asarray(rng.standard_normal((1, 3, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)

    def loss(params, remat):
        model = UNetMotion(dataclasses.replace(config, remat=remat))
        return jnp.mean(jnp.square(model.apply({"params": params}, sample, 500, context)))

    # one checkpoint per resnet (5), spatial transformer block (4) and temporal transformer block (4); a policy name
    # (config.remat_policy) reaches every one of them
    for remat, expected in ((True, 13), ("full", 13), ("dots_saveable", 13), (False, 0), ("none", 0)):
        policies = checkpoint_policies(jax.make_jaxpr(functools.partial(loss, remat=remat))(variables["params"]))
        assert len(policies) == expected, remat
        dots_saveable = sum(policy is jax.checkpoint_policies.dots_saveable for policy in policies)
        assert dots_saveable == (13 if remat == "dots_saveable" else 0), remat
    value, grads = run_jitted(jax.value_and_grad(functools.partial(loss, remat=False)), variables["params"])
    flatten = lambda tree: np.concatenate([np.ravel(g) for g in jax.tree.leaves(tree)])  # noqa: E731
    for remat in (True, "dots_saveable"):
        value_r, grads_r = run_jitted(jax.value_and_grad(functools.partial(loss, remat=remat)), variables["params"])
        assert abs(float(value) - float(value_r)) <= 1e-6 * abs(float(value))
        assert relative_error(flatten(grads_r), flatten(grads)) < 1e-5
    with pytest.raises(ValueError, match="remat_policy 'sometimes'"):
        dataclasses.replace(config, remat="sometimes")

    out32 = run_jitted(UNetMotion(config).apply, variables, sample, 500, context)
    out16 = run_jitted(UNetMotion(dataclasses.replace(config, dtype=jnp.bfloat16)).apply, variables, sample, 500,
                       context)
    assert out16.dtype == jnp.bfloat16
    error = relative_error(np.asarray(out16.astype(jnp.float32)), np.asarray(out32))
    print(f"bfloat16 compute vs float32: relative error {error:.2e}")
    assert error < 3e-2


def test_motion_groupnorm_over_frames_flag():
    """norm_over_frames=True = diffusers (statistics over all frames); False = the original AnimateDiff (per frame)."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    channels, heads, frames = 32, 4, 6
    module = AnimateDiffTransformer3D(num_attention_heads=heads, attention_head_dim=channels // heads,
                                      in_channels=channels, norm_num_groups=8, positional_embeddings="sinusoidal",
                                      num_positional_embeddings=24)
    randomize(module, seed=7).eval()
    generator = torch.Generator().manual_seed(3)
    scales = torch.linspace(0.3, 3.0, frames)  # frames of unequal scale make the two statistics differ
    x = torch.randn(2, frames, channels, 5, 4, generator=generator) * scales[None, :, None, None, None]
    x_torch = x.reshape(2 * frames, channels, 5, 4)  # (B*F, C, H, W)
    with torch.no_grad():
        across = module(x_torch, num_frames=frames).numpy()
        torch_norm = module.norm

        class PerFrameNorm(torch.nn.Module):  # what guoyww/AnimateDiff does: fold frames into the batch first
            def forward(self, hidden):  # (B, C, F, H, W)
                b, c, f, h, w = hidden.shape
                folded = hidden.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
                return torch_norm(folded).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

        module.norm = PerFrameNorm()
        per_frame = module(x_torch, num_frames=frames).numpy()
        module.norm = torch_norm

    state = {k: v.numpy() for k, v in module.state_dict().items() if not k.endswith("pos_embed.pe")}
    ours_input = jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2))  # (B, F, H, W, C)
    results = {}
    for flag in (True, False):
        motion = MotionModule(heads, 1, 8, 24, norm_over_frames=flag)
        abstract = jax.eval_shape(motion.init, jax.random.PRNGKey(0), ours_input)["params"]
        params = fill_params(abstract, state, source="AnimateDiffTransformer3D")
        out = run_jitted(motion.apply, {"params": params}, ours_input)
        results[flag] = np.asarray(out).transpose(0, 1, 4, 2, 3).reshape(across.shape)
    residual = x_torch.numpy()
    modes_differ = relative_error(results[False] - residual, results[True] - residual)  # on the module's update
    # compared on the update (output - input): the residual would hide errors in the module itself
    across_error = relative_error(results[True] - residual, across - residual)
    per_frame_error = relative_error(results[False] - residual, per_frame - residual)
    print(f"across frames {across_error:.2e}, per frame {per_frame_error:.2e}, "
          f"the two modes' updates differ by {modes_differ:.2e}")
    assert across_error < TOLERANCE and per_frame_error < TOLERANCE
    assert modes_differ > 0.1


def test_checkpoint_errors_name_the_key(built, tmp_path):
    case = built("tiny_v1")
    state = {k: v.contiguous() for k, v in case["unet2d"].state_dict().items()}
    config_json = (case["folder"] / "unet" / "config.json").read_text()

    missing = dict(state)
    del missing["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text(config_json)
    save_file(missing, str(tmp_path / "missing" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"):
        load_unet(tmp_path / "missing")

    wrong = dict(state)
    wrong["up_blocks.1.resnets.0.conv1.weight"] = torch.zeros(32, 95, 3, 3)
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text(config_json)
    save_file(wrong, str(tmp_path / "wrong" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"up_blocks\.1\.resnets\.0\.conv1\.weight \(32, 95, 3, 3\)"):
        load_unet(tmp_path / "wrong")


def test_sharded_and_fp16_variant_folders(built, tmp_path):
    """A sharded save (index.json + shards) loads identically; an fp16 variant loads the fp16-rounded weights."""
    import copy
    case = built("tiny_v1")
    _, reference = load_unet(case["folder"] / "unet", case["folder"] / "adapter")
    case["unet2d"].save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    _, sharded = load_unet(tmp_path / "sharded", case["folder"] / "adapter")
    for ours, ref in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))

    copy.deepcopy(case["unet2d"]).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    copy.deepcopy(case["adapter"]).half().save_pretrained(tmp_path / "adapter16", variant="fp16")
    _, half = load_unet(tmp_path / "fp16", tmp_path / "adapter16", variant="fp16")
    for ours, ref in zip(jax.tree.leaves(half), jax.tree.leaves(reference)):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref).astype(np.float16).astype(np.float32))
    with pytest.raises(WeightFileError, match="fp16"):
        load_unet(case["folder"] / "unet", variant="fp16")


def test_config_translation_errors(built):
    import json
    case = built("tiny_v1")
    unet_cfg = json.loads((case["folder"] / "unet" / "config.json").read_text())
    adapter_cfg = json.loads((case["folder"] / "adapter" / "config.json").read_text())
    from jaxvc.models.unet import UNetConfig
    with pytest.raises(UnsupportedConfigError, match="class_embed_type"):
        UNetConfig.from_diffusers({**unet_cfg, "class_embed_type": "timestep"})
    with pytest.raises(UnsupportedConfigError, match="conv_in_channels"):
        UNetConfig.from_diffusers(unet_cfg, {**adapter_cfg, "conv_in_channels": 9})
    with pytest.raises(ValueError, match="motion_layers_per_block"):
        UNetConfig.from_diffusers(unet_cfg, {**adapter_cfg, "motion_layers_per_block": 2})
    config = UNetConfig.from_diffusers(unet_cfg, adapter_cfg, remat=True, norm_over_frames=False)
    assert config.remat and not config.motion.norm_over_frames and config.attention_heads == 4


def test_too_many_frames_is_a_clear_error():
    config = unet_config("tiny", motion="v1")
    model = UNetMotion(config)
    sample = jnp.zeros((1, 25, 8, 8, 4))
    with pytest.raises(ValueError, match="25 frames exceed max_seq_length 24"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, 1, jnp.zeros((1, 3, 32)))


def test_variants_build_abstract_trees():
    """The named sizes build (abstractly); the SD1.5 + v2 tree has the real checkpoints' parameter count."""
    tree = abstract_variables(unet_config("sd15", motion="v2"))["params"]
    sizes = {path: int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    # UNet2DConditionModel SD1.5: 859,520,964 parameters; mm_sd_v15_v2 motion modules: 453,209,280 (without pe)
    assert sum(sizes.values()) == 859_520_964 + 453_209_280
    assert sum(size for path, size in sizes.items() if is_motion_param(path)) == 453_209_280
    assert is_motion_param("up_blocks_1/motion_modules_2/proj_in/kernel") and not is_motion_param("conv_in/kernel")
