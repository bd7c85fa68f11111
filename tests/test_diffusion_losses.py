"""Training-loss helpers against the reference training recipes.

Proves: min-SNR-gamma weights equal diffusers' ``compute_snr``-based recipe (train_text_to_image) for epsilon and
v-prediction; the x0-space v-prediction loss with weight 1/(1 - alpha_bar) equals the CogVideoX fine-tuning loss
computed with diffusers' CogVideoX-5b scheduler (method (e)) and equals the plain v-space MSE (the identity that
motivates the weight); masked means average only the masked elements; timestep draws stay in range.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.diffusion.losses import (diffusion_loss, per_example_loss, sample_noise, sample_timesteps,
                                    x0_space_weight)
from jaxvc.diffusion.schedule import add_noise, get_velocity, make_schedule, schedule_from_diffusers_config, snr
from tests.conftest import relative_error

SHAPE = (4, 3, 4, 4, 6)  # (B, F, H, W, C)
T = np.array([0, 17, 500, 999])


def _data(seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randn(*SHAPE).astype(np.float32) for _ in range(3)]  # x0, noise, model_out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_diffusers_recipe(prediction_type):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
    schedule = schedule_from_diffusers_config(dict(ref.config))
    x0, noise, model_out = _data()
    t = torch.from_numpy(T)
    # diffusers/examples/text_to_image/train_text_to_image.py, snr_gamma branch:
    target = noise if prediction_type == "epsilon" else ref.get_velocity(torch.from_numpy(x0),
                                                                          torch.from_numpy(noise), t).numpy()
    snr_ref = compute_snr(ref, t)
    weights = torch.stack([snr_ref, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]
    weights = weights / snr_ref if prediction_type == "epsilon" else weights / (snr_ref + 1)
    per_ex = torch.nn.functional.mse_loss(torch.from_numpy(model_out), torch.from_numpy(target), reduction="none")
    expected = (per_ex.mean(dim=list(range(1, per_ex.ndim))) * weights).mean().item()

    assert relative_error(snr(schedule, T), snr_ref.numpy()) < 1e-5
    loss, _ = diffusion_loss(schedule, model_out, x0, noise, T, prediction_type=prediction_type,
                             weighting="min_snr", snr_gamma=5.0)
    assert abs(float(loss) - expected) / abs(expected) < 1e-5


def test_cogvideox_x0_space_loss_matches_reference():
    """Method (e): x0_hat = sqrt(ab) x_t - sqrt(1-ab) v_hat; loss = mean(1/(1-ab) * (x0_hat - x0)^2)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.CogVideoXDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                          snr_shift_scale=1.0, timestep_spacing="trailing", clip_sample=False)
    schedule = schedule_from_diffusers_config(dict(ref.config, _class_name="CogVideoXDPMScheduler"))
    x0, noise, model_out = _data(1)
    t = torch.from_numpy(T)
    noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t)
    # CogVideoX LoRA fine-tuning script (and the (e) authors' fork): "model_pred" is the predicted x0.
    x0_pred = ref.get_velocity(torch.from_numpy(model_out), noisy, t)
    w = (1 / (1 - ref.alphas_cumprod[t])).reshape(-1, 1, 1, 1, 1)
    expected = torch.mean((w * (x0_pred - torch.from_numpy(x0)) ** 2).reshape(len(T), -1), dim=1).mean().item()

    loss, per_ex = diffusion_loss(schedule, model_out, x0, noise, T, prediction_type="v_prediction",
                                  x_t=noisy.numpy(), loss_space="x0", weighting="inverse_one_minus_alpha_bar")
    assert abs(float(loss) - expected) / abs(expected) < 1e-5
    # The weight undoes x0 - x0_hat = sqrt(1 - ab)(v_hat - v): the weighted x0 loss IS the v-space MSE.
    v_loss, v_per_ex = diffusion_loss(schedule, model_out, x0, noise, T, prediction_type="v_prediction")
    assert relative_error(per_ex, v_per_ex) < 1e-5
    assert float(x0_space_weight(schedule, 999)) == 1.0  # zero terminal SNR: alpha_bar_999 = 0


def test_clipped_inverse_one_minus_alpha_bar_weight():
    """max_weight clips 1/(1 - ab_t) per example: examples under the cap keep their weight, the others get the cap."""
    schedule = make_schedule(beta_schedule="squaredcos_cap_v2")
    x0, noise, model_out = _data(3)
    t = np.asarray([10, 300, 600, 990])
    _, plain = diffusion_loss(schedule, model_out, x0, noise, t, prediction_type="sample")
    _, weighted = diffusion_loss(schedule, model_out, x0, noise, t, prediction_type="sample",
                                 weighting="inverse_one_minus_alpha_bar", max_weight=5.0)
    weight = 1.0 / (1.0 - np.asarray(schedule.alphas_cumprod)[t])
    assert weight[0] > 5.0 > weight[2]  # one example clipped, one not
    np.testing.assert_allclose(weighted, plain * np.minimum(weight, 5.0), rtol=1e-5)


def test_masked_and_l1_losses():
    x0, noise, model_out = _data(2)
    mask = np.zeros(SHAPE[:-1] + (1,), np.float32)  # per-pixel mask, broadcast over channels
    mask[:, :, 1:3, 0:2] = 1.0
    mask[3] = 0.0  # an example with an empty mask contributes 0
    got = per_example_loss(model_out, noise, mask=mask)
    sel = np.broadcast_to(mask, SHAPE).astype(bool)
    for b in range(3):
        np.testing.assert_allclose(got[b], np.mean((model_out[b] - noise[b])[sel[b]] ** 2), rtol=1e-6)
    assert float(got[3]) == 0.0
    l1 = per_example_loss(model_out, noise, loss_type="l1")
    np.testing.assert_allclose(l1, np.abs(model_out - noise).reshape(4, -1).mean(1), rtol=1e-6)
    with pytest.raises(ValueError, match="does not broadcast"):
        per_example_loss(model_out, noise, mask=np.ones((4, 2)))
    with pytest.raises(ValueError, match="loss_type"):
        per_example_loss(model_out, noise, loss_type="huber")


def test_unweighted_loss_and_draws():
    schedule = make_schedule()
    x0, noise, model_out = _data(3)
    loss, per_ex = diffusion_loss(schedule, model_out, x0, noise, T)  # epsilon, plain MSE
    np.testing.assert_allclose(float(loss), np.mean((model_out - noise) ** 2), rtol=1e-6)
    # x0-space loss of an epsilon model evaluates its x0 estimate at x_t = add_noise(x0, noise, t).
    x_t = add_noise(schedule, x0, noise, T)
    perfect = diffusion_loss(schedule, noise, x0, noise, T, loss_space="x0")[0]
    assert float(perfect) < 1e-8 and float(diffusion_loss(schedule, get_velocity(schedule, x0, noise, T), x0, noise,
                                                          T, prediction_type="v_prediction", x_t=x_t)[0]) < 1e-10
    t = sample_timesteps(jax.random.key(0, impl="rbg"), 4096, min_timestep=100, max_timestep=300)
    assert t.dtype == jnp.int32 and int(t.min()) == 100 and int(t.max()) == 299
    assert sample_noise(jax.random.key(0, impl="rbg"), (3, 5)).shape == (3, 5)
    with pytest.raises(ValueError, match="max_timestep"):
        sample_timesteps(jax.random.key(0), 2, max_timestep=1001)


def test_timestep_bias_draws_the_biased_portion_in_proportion():
    """diffusers' timestep bias ("later": the last `portion` of the timesteps weighs `multiplier` times as much):
    the draws hit that portion at the rate the weights give, within 4 standard errors, and are uniform inside it."""
    from jaxvc.diffusion.losses import timestep_weights

    weights = timestep_weights(1000, "later", multiplier=8.0, portion=0.05)
    np.testing.assert_array_equal(np.asarray(weights), np.r_[np.ones(950), np.full(50, 8.0)])
    # 100k draws: ~590 per late timestep, so the +-20% band below is ~4.9 of its standard deviations
    draws = np.asarray(sample_timesteps(jax.random.key(1), 100_000, weights=weights))
    expected = 50 * 8.0 / (950 + 50 * 8.0)
    stderr = np.sqrt(expected * (1 - expected) / draws.size)
    assert abs(np.mean(draws >= 950) - expected) < 4 * stderr
    late = np.bincount(draws[draws >= 950] - 950, minlength=50)
    assert late.min() > 0.8 * late.mean() and late.max() < 1.2 * late.mean()
    early = timestep_weights(1000, "earlier", multiplier=3.0, portion=0.25)
    assert float(early[249]) == 3.0 and float(early[250]) == 1.0
    window = np.asarray(sample_timesteps(jax.random.key(2), 4096, min_timestep=100, max_timestep=300,
                                         weights=early))
    assert window.min() >= 100 and window.max() <= 299 and np.mean(window < 250) > 0.8  # 450 / 500 of the weight
    with pytest.raises(ValueError, match="strategy 'sooner'"):
        timestep_weights(1000, "sooner")
    with pytest.raises(ValueError, match="portion"):
        timestep_weights(1000, "later", portion=0.0)


def test_sample_skip_is_edm_preconditioning():
    """"sample_skip": x0_hat = c_skip(sigma) x_t / sqrt(ab) + c_out(sigma) F with EDM's c_skip, c_out (sigma_data 0.5)
    computed here in float64 from sigma = sqrt((1 - ab) / ab); identity at t = 0, the output itself at ab -> 0."""
    from jaxvc.diffusion.schedule import SKIP_SIGMA_DATA, skip_coefficients

    schedule = make_schedule("squaredcos_cap_v2")
    t = np.array([0, 5, 100, 300, 500, 700, 900, 990])
    ab = np.asarray(schedule.alphas_cumprod, np.float64)[t]
    sigma = np.sqrt((1 - ab) / ab)
    d = SKIP_SIGMA_DATA
    c_skip, c_out = d ** 2 / (sigma ** 2 + d ** 2), sigma * d / np.sqrt(sigma ** 2 + d ** 2)
    c_x, c_out_ours = skip_coefficients(schedule, t)
    np.testing.assert_allclose(c_x, c_skip / np.sqrt(ab), rtol=1e-5)
    np.testing.assert_allclose(c_out_ours, c_out, rtol=1e-5)
    assert float(c_x[0]) > 0.999 and float(c_out_ours[0]) < 0.01       # nearly clean: the input passes through
    last_x, last_out = skip_coefficients(schedule, 999)                 # ab(999) ~ 0: the output is the estimate
    assert float(last_x) < 1e-3 and abs(float(last_out) - d) < 1e-3


def test_sample_skip_ddim_step_and_min_snr_follow_its_x0():
    """A DDIM step of a "sample_skip" output is the DDIM step of the x0 it implies (eta 0 and 1, same noise); its
    min-SNR weight on the target error equals min(SNR, gamma) on the x0 error."""
    from jaxvc.diffusion.ddim import ddim_step
    from jaxvc.diffusion.schedule import min_snr_weight, predict_x0

    schedule = make_schedule("squaredcos_cap_v2")
    rng = np.random.default_rng(0)
    x_t, out, noise = (jnp.asarray(rng.standard_normal((2, 3, 4, 4)), jnp.float32) for _ in range(3))
    for t in (20, 480, 980):
        x0 = predict_x0(schedule, x_t, out, t, "sample_skip")
        for eta in (0.0, 1.0):
            ours = ddim_step(schedule, out, t, x_t, num_inference_steps=25, eta=eta, noise=noise,
                             prediction_type="sample_skip")
            as_x0 = ddim_step(schedule, x0, t, x_t, num_inference_steps=25, eta=eta, noise=noise,
                              prediction_type="sample")
            np.testing.assert_allclose(ours.prev_sample, as_x0.prev_sample, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ours.pred_original_sample, x0, rtol=1e-6, atol=1e-6)
    x0 = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    t = jnp.asarray([10, 300, 600, 900])
    model_out = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    target_loss, per_target = diffusion_loss(schedule, model_out, x0, eps, t, prediction_type="sample_skip",
                                             weighting="min_snr", snr_gamma=5.0)
    x0_loss, per_x0 = diffusion_loss(schedule, model_out, x0, eps, t, prediction_type="sample_skip",
                                     loss_space="x0", weighting="min_snr", snr_gamma=5.0)
    np.testing.assert_allclose(per_target, per_x0, rtol=1e-4)
    np.testing.assert_allclose(min_snr_weight(schedule, t, 5.0, "sample"), jnp.minimum(snr(schedule, t), 5.0))
