"""Flow-matching Euler parity with diffusers 0.42.1 ``FlowMatchEulerDiscreteScheduler`` (static shift).

Proves: identical timesteps and sigmas (bit for bit) for several shifts and step counts; each Euler step (also the
stochastic variant, fed the same noise) and the jitted lax.scan loop over a deterministic toy model equal diffusers'
to < 1e-5; flow_add_noise equals ``scale_noise``; and the flow algebra is exact (a perfect velocity moves a noised
sample exactly along its straight path).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.diffusion.flow import (FlowMatchEulerSampler, flow_add_noise, flow_euler_step, flow_predict_x0,
                                  flow_sigmas, flow_target, sample_flow_sigmas)
from jaxvc.diffusion.sampling import sample, step_noise
from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
flow_module = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")

TOL = 1e-5
SHAPE = (1, 3, 4, 6, 8)  # a small video latent (B, F, H, W, C); the step is elementwise


def toy_model_np(x, t):
    return 0.1 * x + np.sin(np.float32(t) / np.float32(100.0))


def toy_model_jax(x, t, step_index):
    return 0.1 * x + jnp.sin(t / 100.0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.0])
def test_sigmas_and_timesteps_equal_diffusers(shift):
    for steps in (1, 10, 25, 50):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(steps)
        timesteps, sigmas = flow_sigmas(steps, shift=shift)
        assert timesteps.dtype == sigmas.dtype == np.float32
        np.testing.assert_array_equal(timesteps, ref.timesteps.numpy(), err_msg=f"shift={shift} n={steps}")
        np.testing.assert_array_equal(sigmas, ref.sigmas.numpy(), err_msg=f"shift={shift} n={steps}")


@pytest.mark.parametrize("shift,steps", [(1.0, 10), (3.0, 25), (5.0, 50)])
def test_euler_steps_match_diffusers(shift, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sampler = FlowMatchEulerSampler(steps, shift=shift)
    step = jax.jit(sampler.step)
    x = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        model_out = toy_model_np(x, t.item())
        expected = ref.step(torch.from_numpy(model_out), t, torch.from_numpy(x)).prev_sample.numpy()
        err = relative_error(step(model_out, i, x).prev_sample, expected)
        assert err < TOL, (shift, steps, i, err)
        worst = max(worst, err)
        x = expected
    print(f"flow Euler per-step worst relative error shift={shift} n={steps}: {worst:.2e}")


def test_stochastic_step_matches_diffusers(monkeypatch):
    """stochastic_sampling re-noises x0 to the next sigma; diffusers draws that noise itself, so hand it ours."""
    steps, shift = 10, 3.0
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
    ref.set_timesteps(steps)
    sampler = FlowMatchEulerSampler(steps, shift=shift, stochastic_sampling=True)
    rng = jax.random.key(1, impl="rbg")
    noises = [np.array(step_noise(rng, i, SHAPE)) for i in range(steps)]
    current = {}
    monkeypatch.setattr(flow_module, "randn_tensor", lambda *a, **k: torch.from_numpy(noises[current["i"]]))
    x_T = np.random.RandomState(2).randn(*SHAPE).astype(np.float32)
    x = torch.from_numpy(x_T)
    for i, t in enumerate(ref.timesteps):
        current["i"] = i
        ours = sampler.step(jnp.asarray(toy_model_np(x.numpy(), t.item())), i, x.numpy(), noises[i]).prev_sample
        x = ref.step(torch.from_numpy(toy_model_np(x.numpy(), t.item())), t, x).prev_sample
        assert relative_error(ours, x.numpy()) < TOL, i
    loop = jax.jit(lambda x0, key: sample(toy_model_jax, x0, sampler, rng=key))(x_T, rng)
    err = relative_error(loop, x.numpy())
    print(f"flow stochastic 10-step loop relative error: {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("shift,steps", [(1.0, 10), (5.0, 10), (3.0, 30)])
def test_jitted_scan_loop_matches_diffusers_loop(shift, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    x_T = np.random.RandomState(3).randn(*SHAPE).astype(np.float32)
    x = torch.from_numpy(x_T)
    for t in ref.timesteps:
        x = ref.step(torch.from_numpy(toy_model_np(x.numpy(), t.item())), t, x).prev_sample
    sampler = FlowMatchEulerSampler.from_diffusers_config(dict(ref.config), steps)
    ours = jax.jit(lambda x0: sample(toy_model_jax, x0, sampler))(x_T)
    err = relative_error(ours, x.numpy())
    print(f"flow {steps}-step loop shift={shift}: relative error {err:.2e}")
    assert err < TOL


def test_flow_add_noise_matches_scale_noise():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(20)
    rs = np.random.RandomState(4)
    x0, noise = rs.randn(2, *SHAPE[1:]).astype(np.float32), rs.randn(2, *SHAPE[1:]).astype(np.float32)
    idx = [0, 13]
    expected = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[idx], torch.from_numpy(noise)).numpy()
    ours = flow_add_noise(x0, noise, ref.sigmas.numpy()[idx])
    assert relative_error(ours, expected) < TOL


def test_flow_algebra_is_exact():
    rs = np.random.RandomState(5)
    x0, noise = rs.randn(*SHAPE).astype(np.float32), rs.randn(*SHAPE).astype(np.float32)
    sigma, sigma_next = 0.8, 0.35
    x_t = flow_add_noise(x0, noise, sigma)
    v = flow_target(x0, noise)
    assert relative_error(flow_predict_x0(x_t, v, sigma), x0) < 1e-6
    # The true velocity carries x_sigma exactly onto x_{sigma_next} of the same straight path.
    out = flow_euler_step(v, sigma, sigma_next, x_t)
    assert relative_error(out.prev_sample, flow_add_noise(x0, noise, sigma_next)) < 1e-6
    assert relative_error(out.pred_original_sample, x0) < 1e-6
    # Training noise levels: on the shifted grid, in (0, 1].
    sigmas, timesteps = sample_flow_sigmas(jax.random.key(0, impl="rbg"), 256, shift=3.0)
    assert float(sigmas.min()) > 0 and float(sigmas.max()) <= 1.0
    np.testing.assert_allclose(timesteps, sigmas * 1000, rtol=1e-6)
    unshifted = np.asarray(sigmas, np.float64) / (3.0 - 2.0 * np.asarray(sigmas, np.float64))  # invert the shift
    np.testing.assert_allclose(unshifted * 1000, np.round(unshifted * 1000), atol=1e-3)


def test_config_refuses_unsupported_options():
    cfg = dict(diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0).config)
    assert FlowMatchEulerSampler.from_diffusers_config(cfg, 10).shift == 5.0
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatchEulerSampler.from_diffusers_config(dict(cfg, use_dynamic_shifting=True), 10)
    with pytest.raises(ValueError, match="shift must be > 0"):
        FlowMatchEulerSampler(10, shift=0.0)
