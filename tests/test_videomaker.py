"""VideoMaker's defining mechanisms: PISA (against a PyTorch reference on diffusers' UNetMotionModel), the reference
output as the mean over frames, every frame depending on the reference, GIRL, and the trainable subset."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.models.attention import Attention
from jaxvc.models.transformer2d import reference_injected_self_attention
from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

GENERATED, BATCH, SIZE = 3, 2, 8


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """A randomized diffusers UNetMotionModel (2 levels, v3-style adapter) and the same weights loaded by jaxvc."""
    from jaxvc.convert.unet import load_unet

    unet2d = diffusers.UNet2DConditionModel(
        sample_size=SIZE, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
    adapter = diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                                      motion_num_attention_heads=4, motion_norm_num_groups=8,
                                      motion_max_seq_length=32, use_motion_mid_block=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (unet2d, adapter):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.08)
    root = tmp_path_factory.mktemp("pisa")
    unet2d.save_pretrained(root / "unet")
    adapter.save_pretrained(root / "adapter")
    config, variables = load_unet(root / "unet", root / "adapter")
    torch_unet = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    return torch_unet, config, variables


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    video = rng.standard_normal((BATCH, GENERATED, SIZE, SIZE, 4)).astype(np.float32)
    reference = rng.standard_normal((BATCH, 1, SIZE, SIZE, 4)).astype(np.float32)
    text = rng.standard_normal((BATCH, 6, 32)).astype(np.float32)
    return video, reference, text, np.array([400, 35])


def _torch_forward(torch_unet, video, text, timesteps):
    frames = video.shape[1]
    sample = torch.from_numpy(video).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
    context = torch.from_numpy(text).repeat_interleave(frames, dim=0)  # diffusers wants (B*F, L, D)
    with torch.no_grad():
        out = torch_unet(sample, torch.from_numpy(timesteps), context).sample
    return out.permute(0, 2, 3, 4, 1).numpy()  # (B, F, H, W, C)


@pytest.mark.parametrize("reference_cross_attention", [True, False])
def test_pisa_matches_pytorch_reference_processor(tiny_unet, reference_cross_attention):
    from jaxvc.bench.torch_pisa import install_reference_injection, remove_reference_injection
    from jaxvc.models.unet import UNetMotion

    torch_unet, config, variables = tiny_unet
    video, reference, text, t = _inputs()
    install_reference_injection(torch_unet, GENERATED + 1, reference_cross_attention)
    try:
        expected = _torch_forward(torch_unet, np.concatenate([video, reference], axis=1), text, t)
    finally:
        remove_reference_injection(torch_unet)
    ours = jax.jit(UNetMotion(config).apply, static_argnames="reference_cross_attention")(  # eager: 300 ops
        variables, video, t, text, reference_latent=reference, reference_cross_attention=reference_cross_attention)
    assert ours.shape == (BATCH, GENERATED + 1, SIZE, SIZE, 4)
    assert relative_error(ours, expected) < 1e-5


def test_without_reference_the_unet_is_plain_animatediff(tiny_unet):
    from jaxvc.models.unet import UNetMotion

    torch_unet, config, variables = tiny_unet
    video, _, text, t = _inputs(1)
    expected = _torch_forward(torch_unet, video, text, t)
    ours = jax.jit(UNetMotion(config).apply)(variables, video, t, text)
    assert relative_error(ours, expected) < 1e-5


def test_reference_output_is_the_mean_over_frames():
    """PISA on one attention layer equals, frame by frame, plain attention over [frame; reference] tokens."""
    frames, tokens, channels = GENERATED + 1, 5, 16
    attention = Attention(heads=2, head_dim=8)
    normed = jax.random.normal(jax.random.key(0), (BATCH * frames, tokens, channels))
    variables = attention.init(jax.random.key(1), normed[:1], reference_tokens=normed[:1])
    out = attention.apply(variables, normed, frames, method=lambda module, x, f:
                          reference_injected_self_attention(module, x, f))
    video = normed.reshape(BATCH, frames, tokens, channels)
    out = out.reshape(BATCH, frames, tokens, channels)
    for b in range(BATCH):
        reference_outputs = []
        for f in range(GENERATED):
            joint = jnp.concatenate([video[b, f], video[b, -1]], axis=0)[None]  # (1, 2L, C)
            full = attention.apply(variables, joint)[0]  # plain self-attention over the 2L tokens
            np.testing.assert_allclose(out[b, f], full[:tokens], rtol=1e-5, atol=1e-6)
            reference_outputs.append(full[tokens:])
        np.testing.assert_allclose(out[b, -1], np.mean(reference_outputs, axis=0), rtol=1e-5, atol=1e-6)


def test_every_frame_depends_on_the_reference(tiny_unet):
    from jaxvc.models.unet import UNetMotion

    _, config, variables = tiny_unet
    video, reference, text, t = _inputs(2)
    apply = jax.jit(UNetMotion(config).apply)  # one program for the three calls (eagerly: ~350 small ones)
    base = apply(variables, video, t, text, reference_latent=reference)
    other = _inputs(3)[1]  # another random reference (a constant shift would be normalized away per frame)
    moved = apply(variables, video, t, text, reference_latent=other)
    scale = np.abs(np.asarray(base))[:, :GENERATED].mean()
    change = np.abs(np.asarray(moved - base))[:, :GENERATED].mean(axis=(2, 3, 4)) / scale  # (B, F) per frame
    # float32 evaluation noise is ~1e-7 relative; any real dependence is orders of magnitude above it (with random
    # weights attention is near-uniform, so the reference moves each frame by a few tenths of a percent)
    assert change.min() > 1e-4, change
    # and the conditioning is the reference's content, not a constant offset: zero reference != this reference
    zero = apply(variables, video, t, text, reference_latent=jnp.zeros_like(reference))
    assert np.abs(np.asarray(zero - base))[:, :GENERATED].mean() / scale > 1e-4


# ---------------------------------------------------------------------------------------------- the method
@pytest.fixture(scope="module")
def method():
    from jaxvc.methods.videomaker import VideoMaker, VideoMakerOptions
    from jaxvc.models.clip_text import CLIPTextConfig
    from jaxvc.models.unet import unet_config

    unet = unet_config("tiny", "v3", in_channels=3, out_channels=3)
    text = CLIPTextConfig.variant("tiny")
    empty = np.array([[49406] + [49407] * 76], np.int32)
    return VideoMaker(unet, text, None, VideoMakerOptions(drop_both_prob=0.0), empty, num_frames=GENERATED,
                      image_size=SIZE)


def _random_batch(seed, tokens=(49406, 320, 49407)):
    """BATCH random videos and references in [-1, 1], each with the caption `tokens` padded to 77 with 49407."""
    rng = np.random.default_rng(seed)
    return {"video": jnp.asarray(rng.uniform(-1, 1, (BATCH, GENERATED, SIZE, SIZE, 3)), jnp.float32),
            "reference": jnp.asarray(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)), jnp.float32),
            "tokens": jnp.asarray(np.tile(np.array([list(tokens) + [49407] * (77 - len(tokens))]), (BATCH, 1)),
                                  jnp.int32)}


def _loss_draws(key, batch):
    """The draws VideoMaker.loss makes from `key` (no condition dropout): t, t' = floor(0.01 t), the video noise and
    the reference noise."""
    from jaxvc.diffusion.losses import sample_timesteps

    rng_t, rng_noise, rng_ref_noise, _ = jax.random.split(key, 4)
    t = sample_timesteps(rng_t, BATCH, 1000)
    t_ref = jnp.floor(0.01 * t).astype(jnp.int32)
    noise = jax.random.normal(rng_noise, batch["video"].shape)
    reference_noise = jax.random.normal(rng_ref_noise, batch["reference"][:, None].shape)
    return t, t_ref, noise, reference_noise


def test_trainable_subset_is_spatial_self_attention_and_motion_modules(method):
    from flax import traverse_util

    paths = list(traverse_util.flatten_dict(method.abstract_params()).keys())
    trainable = [p for p in paths if method.trainable(p)]
    assert trainable and all(p[1] == "unet" for p in trainable)
    for path in trainable:
        spatial_attn1 = "attn1" in path and any(s.startswith("attentions_") for s in path)
        assert spatial_attn1 or any(s.startswith("motion_modules_") for s in path), path
    # every spatial attn1 q/k/v/out trains; cross-attention, resnets, FFN and norms of the UNet do not
    for path in paths:
        if path[1] != "unet":
            assert not method.trainable(path)
        elif any(s.startswith("attentions_") for s in path) and "attn1" in path:
            assert method.trainable(path), path
        elif any(s in ("attn2", "ff", "norm1", "norm2", "norm3") for s in path) and not any(
                s.startswith("motion_modules_") for s in path):
            assert not method.trainable(path), path
    assert not method.trainable(("params", "unet", "down_blocks_0", "resnets_0", "conv1", "kernel"))


def test_text_encoder_trains_only_when_asked(method):
    """train_text_encoder (models trained from scratch): every text-encoder weight is trainable and gets a non-zero
    gradient from the loss; by default (the paper) the text encoder is frozen and the loss sends it no gradient."""
    import dataclasses

    from flax import linen as nn
    from flax import traverse_util

    from jaxvc.methods.videomaker import VideoMaker

    params = nn.unbox(method.init_params(jax.random.key(0)))
    batch = _random_batch(5, tokens=(49406, 320, 1823, 49407))
    trained = VideoMaker(method.unet.config, method.text_encoder.config, None,
                         dataclasses.replace(method.options, train_text_encoder=True), method.empty_prompt_tokens,
                         num_frames=GENERATED, image_size=SIZE)
    for model, trains in ((method, False), (trained, True)):
        grads = jax.jit(jax.grad(lambda p: model.loss(p, batch, jax.random.key(1))[0]))(params)  # eager: 1,000 ops
        flat = traverse_util.flatten_dict(grads)
        text_paths = [path for path in flat if path[1] == "text_encoder"]
        assert text_paths and all(model.trainable(path) == trains for path in text_paths)
        text_grad = sum(float(jnp.abs(flat[path]).sum()) for path in text_paths)
        assert (text_grad > 0) == trains, text_grad
        assert model.trainable(("params", "unet", "down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1",
                                "to_q", "kernel"))


def test_girl_loss_is_the_paper_formula(method):
    """Recompute GIRL by hand from the same random draws: t' = floor(0.01 t), beta = 0.1, plain mean MSE."""
    from flax import linen as nn

    from jaxvc.diffusion.schedule import add_noise

    params = nn.unbox(method.init_params(jax.random.key(0)))
    batch = _random_batch(3)
    key = jax.random.key(7)
    loss, metrics = method.loss(params, batch, key)

    t, t_ref, noise, reference_noise = _loss_draws(key, batch)
    reference = batch["reference"][:, None]
    prediction = method.denoise(params, add_noise(method.schedule, batch["video"], noise, t), t,
                                method.encode_text(params, batch["tokens"]),
                                add_noise(method.schedule, reference, reference_noise, t_ref))
    video_loss = jnp.mean(jnp.square(prediction[:, :GENERATED] - noise))
    reference_loss = jnp.mean(jnp.square(prediction[:, GENERATED:] - reference_noise))
    np.testing.assert_allclose(loss, video_loss + 0.1 * reference_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["reference_loss"], reference_loss, rtol=1e-5)
    assert np.all(np.asarray(t_ref) <= np.asarray(t) // 100)


def test_x0_space_loss_of_v_prediction(method):
    """loss_space="x0" with v-prediction: the v output is turned into x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v_hat (a
    skip connection from the noisy input) and compared with the clean video and the clean reference, recomputed by
    hand from the same draws; with the default loss_space it is the plain v-space loss."""
    import dataclasses

    from flax import linen as nn

    from jaxvc.diffusion.schedule import add_noise
    from jaxvc.methods.videomaker import VideoMaker

    def build(**changes):
        return VideoMaker(method.unet.config, method.text_encoder.config, None,
                          dataclasses.replace(method.options, prediction_type="v_prediction", **changes),
                          method.empty_prompt_tokens, num_frames=GENERATED, image_size=SIZE)

    x0_method, v_method = build(loss_space="x0"), build()
    params = nn.unbox(method.init_params(jax.random.key(0)))
    batch = _random_batch(4)
    key = jax.random.key(11)
    t, t_ref, noise, reference_noise = _loss_draws(key, batch)
    video, reference = batch["video"], batch["reference"][:, None]
    noisy = add_noise(method.schedule, video, noise, t)
    noisy_reference = add_noise(method.schedule, reference, reference_noise, t_ref)
    v_hat = method.denoise(params, noisy, t, method.encode_text(params, batch["tokens"]), noisy_reference)

    def x0_error(v_pred, x_t, clean, steps):
        ab = method.schedule.alphas_cumprod[steps][:, None, None, None, None]
        return jnp.mean(jnp.square(jnp.sqrt(ab) * x_t - jnp.sqrt(1 - ab) * v_pred - clean))

    def v_error(v_pred, clean, eps, steps):
        ab = method.schedule.alphas_cumprod[steps][:, None, None, None, None]
        return jnp.mean(jnp.square(v_pred - (jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * clean)))

    loss, metrics = x0_method.loss(params, batch, key)
    expected_reference = x0_error(v_hat[:, GENERATED:], noisy_reference, reference, t_ref)
    np.testing.assert_allclose(metrics["reference_loss"], expected_reference, rtol=1e-5)
    np.testing.assert_allclose(loss, x0_error(v_hat[:, :GENERATED], noisy, video, t) + 0.1 * expected_reference,
                               rtol=1e-5)
    plain, _ = v_method.loss(params, batch, key)
    np.testing.assert_allclose(plain, v_error(v_hat[:, :GENERATED], video, noise, t)
                               + 0.1 * v_error(v_hat[:, GENERATED:], reference, reference_noise, t_ref), rtol=1e-5)
    assert abs(float(plain) - float(loss)) > 1e-3  # the two spaces really differ
    with pytest.raises(ValueError, match="loss_space"):
        build(loss_space="eps")


@pytest.mark.parametrize("variant", ["configs/videomaker.py:sd15", "configs/customcrafter.py:sd15",
                                     "configs/microcinema.py:sd15", "configs/still_moving.py:sd15"])
def test_real_size_variants_refuse_to_fine_tune_random_weights(variant):
    """The sd15 variants fine-tune SD1.5 + AnimateDiff: without ``model.pretrained`` they would train a randomly
    initialised model of that size, silently. It is an error naming the key, unless asked for (a plan, a study)."""
    from jaxvc.config_utils import ConfigError, get_config
    from jaxvc.methods import build_method

    with pytest.raises(ConfigError, match="config.model.pretrained is empty, but this variant fine-tunes"):
        build_method(get_config(variant, []))
    method = build_method(get_config(variant, ["model.requires_pretrained=false"]))
    assert method.unet.config.block_out_channels == (320, 640, 1280, 1280)  # SD1.5's size, random weights
