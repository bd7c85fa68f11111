"""DDIM / noise-schedule parity with diffusers 0.42.1 (DDIMScheduler, DDPMScheduler, CogVideoXDDIMScheduler).

Proves: identical timestep lists for every spacing / offset / step count; the same alpha_bar tables; add_noise and
get_velocity equal diffusers'; one DDIM step equals ``DDIMScheduler.step`` (prev_sample and pred_original_sample,
relative error < 1e-5) over the full grid spacing x steps_offset x set_alpha_to_one x prediction x clip x eta x
{10, 25, 30} steps, fed the same variance noise; and the jitted lax.scan loop reproduces diffusers' own 10-step
loop on a deterministic toy model to < 1e-5.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvc.diffusion.ddim import DDIMSampler, ddim_step, ddim_timesteps
from jaxvc.diffusion.sampling import sample, step_noise
from jaxvc.diffusion.schedule import (NoiseSchedule, add_noise, get_target, get_velocity, make_schedule, predict_eps,
                                      predict_x0, schedule_from_diffusers_config)
from tests.conftest import relative_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TOL = 1e-5
SHAPE = (2, 4, 8, 8)


def toy_model_np(x, t):
    """A fixed deterministic 'model' both loops call: 0.1 x + sin(t / 100)."""
    return 0.1 * x + np.sin(np.float32(t) / np.float32(100.0))


def toy_model_jax(x, t, step_index):
    return 0.1 * x + jnp.sin(t.astype(jnp.float32) / 100.0)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers(spacing, offset):
    for steps in (1, 10, 25, 30, 50, 999, 1000):
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, **SD15)
        ref.set_timesteps(steps)
        ours = ddim_timesteps(steps, timestep_spacing=spacing, steps_offset=offset)
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{spacing} offset={offset} n={steps}")


@pytest.mark.parametrize("kwargs", [
    SD15,
    {},  # diffusers defaults: linear 1e-4 -> 0.02
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD15, rescale_betas_zero_snr=True),
])
def test_schedule_tables_match(kwargs):
    ref = diffusers.DDIMScheduler(**kwargs)
    ours = schedule_from_diffusers_config(dict(ref.config))
    err_ac = relative_error(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    err_b = relative_error(ours.betas, ref.betas.numpy())
    assert err_ac < TOL and err_b < TOL, (kwargs, err_ac, err_b)
    if kwargs.get("rescale_betas_zero_snr"):
        assert float(ours.alphas_cumprod[-1]) == 0.0 == float(ref.alphas_cumprod[-1])


def test_cogvideox_snr_shift_schedule_matches():
    # CogVideoX-2b-style config: SNR shift 3 then zero terminal SNR, both applied to alpha_bar.
    ref = diffusers.CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=3.0, **SD15)
    ours = schedule_from_diffusers_config(dict(ref.config))
    assert relative_error(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) < TOL
    # A saved config (it names its class) without the key gets the CogVideoX class default (3.0), as diffusers does.
    cfg = {k: v for k, v in ref.config.items() if k != "snr_shift_scale"}
    cfg["_class_name"] = "CogVideoXDDIMScheduler"
    assert relative_error(schedule_from_diffusers_config(cfg).alphas_cumprod, ref.alphas_cumprod.numpy()) < TOL


def test_add_noise_and_velocity_match_diffusers():
    rs = np.random.RandomState(0)
    x0 = rs.randn(*SHAPE).astype(np.float32)
    noise = rs.randn(*SHAPE).astype(np.float32)
    t = np.array([0, 999], np.int64)
    ddpm = diffusers.DDPMScheduler(**SD15)
    schedule = make_schedule()
    ref_noisy = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ref_v = ddpm.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert relative_error(add_noise(schedule, x0, noise, t), ref_noisy) < TOL
    assert relative_error(get_velocity(schedule, x0, noise, t), ref_v) < TOL
    for t_scalar in (17, 500):  # a scalar timestep for the whole batch
        ref = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([t_scalar])).numpy()
        assert relative_error(add_noise(schedule, x0, noise, t_scalar), ref) < TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "sample_skip"])
def test_prediction_conversions_invert_forward_process(prediction_type):
    rs = np.random.RandomState(1)
    x0 = rs.randn(*SHAPE).astype(np.float32)
    noise = rs.randn(*SHAPE).astype(np.float32)
    t = np.array([10, 700])
    schedule = make_schedule()
    x_t = add_noise(schedule, x0, noise, t)
    target = get_target(schedule, x0, noise, t, prediction_type)
    # A perfect model output recovers exactly the x0 and the noise that made x_t.
    assert relative_error(predict_x0(schedule, x_t, target, t, prediction_type), x0) < 1e-5
    assert relative_error(predict_eps(schedule, x_t, target, t, prediction_type), noise) < 1e-5


@functools.partial(jax.jit, static_argnames=("num_inference_steps", "prediction_type", "clip_sample",
                                              "set_alpha_to_one"))
def _jit_step(schedule, model_out, t, x, eta, noise, **static):
    return ddim_step(schedule, model_out, t, x, eta=eta, noise=noise, **static)


GRID = list(itertools.product(["leading", "linspace", "trailing"], [0, 1], [True, False],
                              ["epsilon", "v_prediction"], [False, True], [0.0, 1.0]))
# A per-element field makes the per-step inputs generic. With the spatially constant sin(t/100) term alone, the
# clip_sample configs reach a step where x0 is clipped to +-1 everywhere and prev = sqrt(ab')x0 + sqrt(1-ab')eps
# nearly cancels (||prev|| is 40x smaller than its terms), so the *relative* error of that one step measures only
# float32 rounding (1.3e-5 there, 2 ulp absolute). test_ddim_step_algebra_float64 covers that model exactly.
FIELD = np.random.RandomState(7).randn(*SHAPE).astype(np.float32)


def _grid_errors(num_steps, schedule_for, model, dtype):
    """Run every GRID config step by step through diffusers, feeding the same (x, model_out, noise) to ours."""
    x_T = np.random.RandomState(2).randn(*SHAPE).astype(dtype)
    rng = jax.random.key(3, impl="rbg")
    noises = [np.array(step_noise(rng, i, SHAPE), dtype=dtype) for i in range(num_steps)]
    worst = 0.0
    for spacing, offset, alpha_one, pred, clip, eta in GRID:
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
                                      prediction_type=pred, clip_sample=clip, **SD15)
        ref.set_timesteps(num_steps)
        schedule = schedule_for(ref)
        x = x_T
        for i, t in enumerate(ref.timesteps.numpy()):
            model_out = model(x, t).astype(dtype)
            out = ref.step(torch.from_numpy(model_out), int(t), torch.from_numpy(x), eta=eta,
                           variance_noise=torch.from_numpy(noises[i]) if eta > 0 else None)
            ours = _jit_step(schedule, model_out, t, x, eta, noises[i], num_inference_steps=num_steps,
                             prediction_type=pred, clip_sample=clip, set_alpha_to_one=alpha_one)
            err = max(relative_error(ours.prev_sample, out.prev_sample.numpy()),
                      relative_error(ours.pred_original_sample, out.pred_original_sample.numpy()))
            worst = max(worst, err)
            yield (spacing, offset, alpha_one, pred, clip, eta, num_steps, i, int(t)), err
            x = out.prev_sample.numpy()
    print(f"ddim per-step ({np.dtype(dtype).name}) worst relative error, {len(GRID)} configs x {num_steps} steps: "
          f"{worst:.2e}")


@pytest.mark.parametrize("num_steps", [10, 25, 30])
def test_ddim_step_matches_diffusers_over_grid(num_steps):
    """float32, our own alpha_bar table: every step of every config within 1e-5 of DDIMScheduler.step."""
    schedule = make_schedule()
    model = lambda x, t: 0.1 * x + np.sin(np.float32(t) / np.float32(100.0)) * FIELD  # noqa: E731
    for where, err in _grid_errors(num_steps, lambda ref: schedule, model, np.float32):
        assert err < TOL, (where, err)


@pytest.mark.parametrize("num_steps", [25])  # the step count whose float32 run has the cancelling step
def test_ddim_step_algebra_float64(num_steps):
    """Same grid with the plain toy model in float64 on both sides (diffusers' table upcast and given to both):
    the formulas agree to rounding (< 1e-12), including the steps where float32 cancels."""
    def schedule_for(ref):
        ref.alphas_cumprod = ref.alphas_cumprod.double()
        ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
        return NoiseSchedule(betas=jnp.asarray(ref.betas.numpy().astype(np.float64)),
                             alphas_cumprod=jnp.asarray(ref.alphas_cumprod.numpy()))

    with jax.enable_x64(True):
        for where, err in _grid_errors(num_steps, schedule_for, toy_model_np, np.float64):
            assert err < 1e-12, (where, err)


def _diffusers_loop(ref, x_T, num_steps, eta, noises):
    ref.set_timesteps(num_steps)
    x = torch.from_numpy(x_T)
    for i, t in enumerate(ref.timesteps):
        model_out = torch.from_numpy(toy_model_np(x.numpy(), t.item()))
        x = ref.step(model_out, t, x, eta=eta, variance_noise=torch.from_numpy(noises[i]) if eta > 0 else None)
        x = x.prev_sample
    return x.numpy()


# Full loops: every (spacing, offset, set_alpha_to_one) once, cycling prediction / clip / eta through all four
# combinations each, plus the configs the methods actually sample with.
_PRED_CLIP_ETA = [("epsilon", False, 0.0), ("v_prediction", True, 1.0), ("epsilon", True, 1.0),
                  ("v_prediction", False, 0.0)]
LOOP_CONFIGS = [dict(timestep_spacing=s, steps_offset=o, set_alpha_to_one=a, prediction_type=p, clip_sample=c, eta=e)
                for (s, o, a), (p, c, e) in zip(itertools.product(["leading", "linspace", "trailing"], [0, 1],
                                                                  [True, False]),
                                                itertools.cycle(_PRED_CLIP_ETA))]


@pytest.mark.parametrize("cfg", LOOP_CONFIGS + [
    # VideoMaker: SD1.5 scheduler, linspace, offset 1, 30 steps, eta 0
    dict(timestep_spacing="linspace", steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon",
         clip_sample=False, eta=0.0, num_steps=30),
    # CustomCrafter-like: eta 1, 25 steps
    dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon",
         clip_sample=False, eta=1.0, num_steps=25),
    # a non-default clip range
    dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="v_prediction",
         clip_sample=True, clip_sample_range=0.5, eta=0.0),
    # CogVideoX-like: v-prediction, trailing, zero terminal SNR
    dict(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, prediction_type="v_prediction",
         clip_sample=False, eta=0.0, rescale_betas_zero_snr=True),
], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_jitted_scan_loop_matches_diffusers_loop(cfg):
    cfg = dict(cfg)
    num_steps, eta = cfg.pop("num_steps", 10), cfg.pop("eta")
    ref = diffusers.DDIMScheduler(**SD15, **cfg)
    x_T = np.random.RandomState(4).randn(*SHAPE).astype(np.float32)
    rng = jax.random.key(5, impl="rbg")  # any key works; rbg just compiles 3x faster than threefry on CPU
    noises = [np.array(step_noise(rng, i, SHAPE)) for i in range(num_steps)]
    expected = _diffusers_loop(ref, x_T, num_steps, eta, noises)

    sampler = DDIMSampler.from_diffusers_config(dict(ref.config), num_steps, eta=eta)
    np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
    ours = jax.jit(lambda x, key: sample(toy_model_jax, x, sampler, rng=key))(x_T, rng)
    err = relative_error(ours, expected)
    print(f"ddim {num_steps}-step loop {cfg} eta={eta}: relative error {err:.2e}")
    assert err < TOL


def test_sd15_scheduler_config_file(tmp_path):
    """from_diffusers_config reads a scheduler folder as saved by diffusers (SD1.5's shipped values)."""
    ref = diffusers.DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.save_pretrained(tmp_path / "scheduler")
    sampler = DDIMSampler.from_diffusers_config(tmp_path / "scheduler", 30)
    assert (sampler.timestep_spacing, sampler.steps_offset, sampler.clip_sample, sampler.set_alpha_to_one) == \
        ("leading", 1, False, False)
    np.testing.assert_array_equal(sampler.timesteps, np.arange(29, -1, -1) * 33 + 1)
    with pytest.raises(ValueError, match="thresholding"):
        DDIMSampler.from_diffusers_config(dict(ref.config, thresholding=True), 30)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMSampler(make_schedule(), 10, timestep_spacing="karras")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDIMSampler.from_diffusers_config(tmp_path / "missing", 30)
