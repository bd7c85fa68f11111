"""UNet options for models trained from scratch (not in SD / AnimateDiff, so there is no diffusers reference):
each option's defining mechanism is tested directly, and each is the plain model when its new weights are zero."""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxvc.models.attention import Attention, apply_rotary, rotary_2d
from jaxvc.models.embeddings import sinusoidal_positions_2d
from jaxvc.models.motion import MotionModule
from jaxvc.models.unet import UNetMotion, unet_config
from tests.conftest import random_unet_variables


@functools.lru_cache(maxsize=None)
def _jitted(config):
    model = UNetMotion(config)
    return jax.jit(model.apply, static_argnames="return_intermediates"), jax.jit(model.init)


def unet_apply(config, variables, *args, **kwargs):
    """UNetMotion(config).apply, jitted once per config (run eagerly, each call compiles 100-300 small programs)."""
    return _jitted(config)[0](variables, *args, **kwargs)


def unet_init(config, *args):
    return _jitted(config)[1](*args)


def _one_level(**overrides):
    return unet_config("tiny", motion="v1", block_out_channels=(32,), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), **overrides)


def test_sinusoidal_positions_2d_encodes_row_then_column():
    table = sinusoidal_positions_2d(3, 5, 8)  # (H, W, 8): channels 0-3 the row, 4-7 the column
    assert table.shape == (3, 5, 8)
    np.testing.assert_array_equal(table[:, 0, :4], table[:, 4, :4])  # row half ignores the column
    np.testing.assert_array_equal(table[0, :, 4:], table[2, :, 4:])  # column half ignores the row
    assert len({tuple(row) for row in table.reshape(-1, 8).round(6)}) == 15  # every pixel distinct


def test_spatial_position_embedding_adds_a_projected_position_table_after_conv_in():
    """conv_in's output gains Dense(sincos(row, col)): on a constant image the interior (away from the zero
    padding) is the same everywhere without it and different at every pixel with it; its kernel starts at zero, so a
    freshly initialised option leaves the model unchanged."""
    plain_config = _one_level()
    config = dataclasses.replace(plain_config, spatial_position_embedding=True)
    params = random_unet_variables(config)["params"]
    plain_params = {k: v for k, v in params.items() if k != "position_embedding"}
    sample = jnp.ones((1, 2, 8, 8, 4))
    timesteps, context = jnp.asarray([300]), jnp.ones((1, 3, 32))

    def conv_in(cfg, p):
        _, inter = unet_apply(cfg, {"params": p}, sample, timesteps, context, return_intermediates=True)
        return np.asarray(inter["conv_in"])[0, 0]  # (8, 8, 32)

    plain, positioned = conv_in(plain_config, plain_params), conv_in(config, params)
    interior = plain[1:-1, 1:-1].reshape(-1, 32)
    np.testing.assert_allclose(interior, np.broadcast_to(interior[:1], interior.shape), atol=1e-5)
    embedding = params["position_embedding"]
    expected = plain + sinusoidal_positions_2d(8, 8, 32) @ np.asarray(embedding["kernel"]) + np.asarray(
        embedding["bias"])
    np.testing.assert_allclose(positioned, expected, atol=1e-5)
    assert len({tuple(v) for v in positioned[1:-1, 1:-1].reshape(-1, 32).round(4)}) == 36

    fresh = unet_init(config, jax.random.key(0), sample, timesteps, context)["params"]
    assert not np.any(np.asarray(nn.unbox(fresh["position_embedding"]["kernel"])))
    fresh_plain = {k: v for k, v in fresh.items() if k != "position_embedding"}
    np.testing.assert_allclose(unet_apply(config, {"params": fresh}, sample, timesteps, context),
                               unet_apply(plain_config, {"params": fresh_plain}, sample, timesteps, context),
                               atol=1e-6)


def test_position_free_reference_leaves_the_position_embedding_off_the_reference_frame():
    """With reference injection and position_free_reference, conv_in's output for the reference frame (the last) is
    the plain one and the generated frames gain the position table; without the option every frame gains it."""
    config = _one_level(spatial_position_embedding=True)
    params = random_unet_variables(config)["params"]
    embedding = params["position_embedding"]
    table = sinusoidal_positions_2d(8, 8, 32) @ np.asarray(embedding["kernel"]) + np.asarray(embedding["bias"])
    rng = np.random.default_rng(2)
    sample = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 4)), jnp.float32)
    reference = jnp.asarray(rng.standard_normal((2, 1, 8, 8, 4)), jnp.float32)
    timesteps, context = jnp.asarray([300, 600]), jnp.ones((2, 3, 32))

    def conv_in(cfg):
        _, inter = unet_apply(cfg, {"params": params}, sample, timesteps, context, reference_latent=reference,
                              return_intermediates=True)
        return np.asarray(inter["conv_in"])  # (B, F+1, 8, 8, 32)

    everywhere = conv_in(config)
    free = conv_in(dataclasses.replace(config, position_free_reference=True))
    np.testing.assert_allclose(free[:, :3], everywhere[:, :3], atol=1e-6)  # generated frames: unchanged
    np.testing.assert_allclose(free[:, 3], everywhere[:, 3] - table, atol=1e-5)  # reference: table removed
    assert np.abs(table).mean() > 1e-2  # the random table is not negligible, so the check above means something


def test_reference_time_embedding_adds_the_embedded_reference_to_the_timestep_embedding():
    """reference_time_embedding: the flattened reference (B, H*W*C) through linear -> SiLU -> linear joins the
    timestep embedding. Fresh, its output layer is zero (the plain model); with trained (here random) weights the
    output depends on it; a missing reference is the zero reference (linear_1's kernel then does not matter, its
    bias does)."""
    plain_config = _one_level()
    config = dataclasses.replace(plain_config, reference_time_embedding=True)
    rng = np.random.default_rng(3)
    sample = jnp.asarray(rng.standard_normal((2, 2, 8, 8, 4)), jnp.float32)
    reference = jnp.asarray(rng.standard_normal((2, 1, 8, 8, 4)), jnp.float32)
    timesteps, context = jnp.asarray([300, 600]), jnp.ones((2, 3, 32))

    def run(cfg, p, ref="none"):
        extra = {} if isinstance(ref, str) else {"reference_latent": ref}
        return np.asarray(unet_apply(cfg, {"params": p}, sample, timesteps, context, **extra))

    fresh = nn.unbox(unet_init(config, jax.random.key(0), sample, timesteps, context)["params"])
    embedding = fresh["reference_embedding"]
    assert embedding["linear_1"]["kernel"].shape == (8 * 8 * 4, 4 * 32)  # tied to the latent size
    assert not np.any(np.asarray(embedding["linear_2"]["kernel"]))
    without = lambda p: {k: v for k, v in p.items() if k != "reference_embedding"}
    np.testing.assert_allclose(run(config, fresh, reference), run(plain_config, without(fresh), reference),
                               atol=1e-6)

    params = jax.tree.map(lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32), fresh)
    with_option, plain = run(config, params, reference), run(plain_config, without(params), reference)
    assert np.abs(with_option - plain).mean() > 1e-3

    def with_linear_1(kernel_scale, bias_shift):
        changed = jax.tree.map(lambda x: x, params)
        linear_1 = changed["reference_embedding"]["linear_1"]
        changed["reference_embedding"]["linear_1"] = {"kernel": linear_1["kernel"] * kernel_scale,
                                                      "bias": linear_1["bias"] + bias_shift}
        return changed

    np.testing.assert_allclose(run(config, with_linear_1(3.0, 0.0)), run(config, params), atol=1e-6)
    np.testing.assert_allclose(run(config, with_linear_1(3.0, 0.0), jnp.zeros_like(reference)),
                               run(config, params, jnp.zeros_like(reference)), atol=1e-6)
    assert np.abs(run(config, with_linear_1(1.0, 0.5)) - run(config, params)).mean() > 1e-3


def test_rotary_2d_makes_attention_logits_depend_on_token_offsets_only():
    """rotary_2d + apply_rotary: q_a . k_b depends on the (row, column) offset b - a, not on where a sits; position
    (0, 0) is unrotated; rows and columns are told apart."""
    height, width, head_dim = 4, 5, 16
    cos, sin = rotary_2d(height, width, head_dim, theta=16.0)
    assert cos.shape == sin.shape == (height * width, head_dim)
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, head_dim)), jnp.float32) for _ in range(2))
    grid = lambda x: apply_rotary(jnp.broadcast_to(x, (1, height * width, 1, head_dim)), cos, sin)[0, :, 0]
    queries, keys = grid(q), grid(k)
    np.testing.assert_allclose(queries[0], q[0, 0, 0], atol=1e-6)
    logits = np.asarray(queries @ keys.T)  # (L, L)
    by_offset = {}
    for a in range(height * width):
        for b in range(height * width):
            offset = (b // width - a // width, b % width - a % width)
            by_offset.setdefault(offset, []).append(logits[a, b])
    for values in by_offset.values():
        np.testing.assert_allclose(values, values[0], atol=1e-4)
    assert abs(by_offset[(1, 0)][0] - by_offset[(0, 1)][0]) > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        rotary_2d(2, 2, 6, theta=16.0)


def test_spatial_rope_adds_no_parameters_and_reaches_pisa():
    """spatial_rope_theta rotates queries and keys of every spatial self-attention, reference tokens included: same
    parameters, different outputs with and without a reference; None is the plain model."""
    config = _one_level()
    rope = dataclasses.replace(config, spatial_rope_theta=16.0)
    params = random_unet_variables(config)["params"]
    # sharpen the self-attention (0.1-std weights leave its softmax uniform, where positions cannot matter)
    sharpen = lambda path, leaf: leaf * 30 if any(getattr(k, "key", None) in ("to_q", "to_k") for k in path) and any(
        getattr(k, "key", None) == "attn1" for k in path) else leaf
    params = jax.tree_util.tree_map_with_path(sharpen, params)
    rng = np.random.default_rng(4)
    sample = jnp.asarray(rng.standard_normal((1, 2, 8, 8, 4)), jnp.float32)
    reference = jnp.asarray(rng.standard_normal((1, 1, 8, 8, 4)), jnp.float32)
    timesteps, context = jnp.asarray([300]), jnp.ones((1, 3, 32))
    rope_params = jax.eval_shape(UNetMotion(rope).init, jax.random.key(0), sample, timesteps, context)["params"]
    assert jax.tree_util.tree_structure(nn.unbox(rope_params)) == jax.tree_util.tree_structure(params)
    for kwargs in ({}, {"reference_latent": reference}):
        plain_out = unet_apply(config, {"params": params}, sample, timesteps, context, **kwargs)
        rope_out = unet_apply(rope, {"params": params}, sample, timesteps, context, **kwargs)
        assert plain_out.shape == rope_out.shape
        assert float(jnp.max(jnp.abs(plain_out - rope_out))) > 1e-2 * float(jnp.max(jnp.abs(plain_out)))


def test_motion_text_cross_attention_reads_the_caption_per_frame():
    """MotionConfig.text_cross_attention: attn2 of each temporal block attends to the text. The folded computation
    (all B*H*W sequences of a video against one key/value set) equals cross-attention of every sequence to its own
    copy of the video's text; plain AnimateDiff motion modules ignore the caption, these do not."""
    rng = np.random.default_rng(5)
    video = jnp.asarray(rng.standard_normal((2, 3, 4, 4, 32)), jnp.float32)  # (B, F, H, W, C)
    captions = jnp.asarray(rng.standard_normal((2, 6, 24)), jnp.float32)  # (B, L, D)
    module = MotionModule(heads=4, norm_num_groups=8)
    params = module.init(jax.random.key(0), video, captions)["params"]
    params = jax.tree.map(lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32),
                          nn.unbox(params))
    assert params["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (24, 32)  # keys from the text

    # reference: attn2 alone, each (b, h, w) sequence against its own copy of caption b
    block = params["transformer_blocks_0"]
    hidden = jnp.asarray(rng.standard_normal((2 * 16, 3, 32)), jnp.float32)  # (B*H*W, F, C), b-major
    repeated = jnp.repeat(captions, 16, axis=0)  # (B*H*W, L, D)
    attention = Attention(heads=4, head_dim=8)
    per_sequence = attention.apply({"params": block["attn2"]}, hidden, repeated)
    folded = attention.apply({"params": block["attn2"]}, hidden.reshape(2, -1, 32), captions).reshape(hidden.shape)
    np.testing.assert_allclose(folded, per_sequence, atol=1e-5)

    out = module.apply({"params": params}, video, captions)
    other_caption = module.apply({"params": params}, video, captions[::-1])
    assert np.abs(np.asarray(out - other_caption)).mean() > 1e-2 * np.abs(np.asarray(out)).mean()
    # the rows of video 0 are unchanged when only video 1's caption changes: captions do not leak across videos
    swapped = module.apply({"params": params}, video, captions.at[1].set(captions[0] * 2))
    np.testing.assert_allclose(swapped[0], out[0], atol=1e-6)

    plain = MotionModule(heads=4, norm_num_groups=8)
    plain_params = plain.init(jax.random.key(0), video)["params"]
    np.testing.assert_array_equal(plain.apply({"params": plain_params}, video),
                                  plain.apply({"params": plain_params}, video, None))


def test_motion_text_cross_attention_through_the_unet():
    """unet_config(..., motion_text_cross_attention=True) wires the text into every motion module: the UNet output
    then depends on the caption even where the spatial cross-attention is zeroed out."""
    config = _one_level(motion_text_cross_attention=True)
    params = random_unet_variables(config)["params"]
    flat = flax.traverse_util.flatten_dict(params)
    # silence the spatial transformer's text path (its attn2 output projection), keep the motion modules'
    spatial_text = lambda k: any(p.startswith("attentions_") for p in k) and "attn2" in k and "to_out_0" in k
    flat = {k: (jnp.zeros_like(v) if spatial_text(k) else v) for k, v in flat.items()}
    params = flax.traverse_util.unflatten_dict(flat)
    rng = np.random.default_rng(2)
    sample = jnp.asarray(rng.standard_normal((1, 3, 8, 8, 4)), jnp.float32)
    first, second = (jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32) for _ in range(2))
    a = unet_apply(config, {"params": params}, sample, jnp.asarray([500]), first)
    b = unet_apply(config, {"params": params}, sample, jnp.asarray([500]), second)
    assert np.abs(np.asarray(a - b)).mean() > 1e-3 * np.abs(np.asarray(a)).mean()
    plain = _one_level()
    plain_flat = {k: v for k, v in flat.items() if not ("motion_modules" in "/".join(k) and "attn2" in k)}
    plain_params = random_unet_variables(plain)["params"]
    plain_params = flax.traverse_util.unflatten_dict({**flax.traverse_util.flatten_dict(plain_params),
                                                      **plain_flat})
    a = unet_apply(plain, {"params": plain_params}, sample, jnp.asarray([500]), first)
    b = unet_apply(plain, {"params": plain_params}, sample, jnp.asarray([500]), second)
    np.testing.assert_allclose(a, b, atol=1e-6)  # no text path left at all without the option
