"""DPM-Solver++ and UniPC (``jaxvc/diffusion/dpm_solver.py``, ``unipc.py``) against diffusers 0.42.1's
``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler``, and their defining property: higher order.

Proves: the same integer timesteps (exactly) and sigmas for VP schedules (epsilon, v; linspace/leading/trailing
spacing; Karras sigmas; final sigma 0 or sigma_min) and flow-matching sigmas (Wan's shift); every step of the jitted
``lax.scan`` loop equals diffusers' step-by-step loop on a deterministic toy model to < 1e-5 of the trajectory's
scale (orders 1-3, midpoint/Heun, bh1/bh2, noise-prediction UniPC, a disabled corrector, the SDE variant fed the
same noise); on Gaussian data, where the exact ODE solution is known, the error falls as 1/n for the first-order
update, 1/n^2 for DPM-Solver++ 2M and 1/n^3 for UniPC-2 (its corrector), and on Wan's flow sigmas both land far
closer than Euler; the name switch and bad configurations (refused by name).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxvc.diffusion.ddim import DDIMSampler
from jaxvc.diffusion.dpm_solver import DPMSolverSampler
from jaxvc.diffusion.flow import FlowMatchEulerSampler
from jaxvc.diffusion.sampling import sample, step_noise
from jaxvc.diffusion.samplers import SAMPLERS, make_sampler, sampler_names
from jaxvc.diffusion.schedule import make_schedule
from jaxvc.diffusion.unipc import UniPCSampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SHAPE = (1, 3, 4, 6, 4)  # a small video latent (B, F, H, W, C); every step is elementwise
SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
# the scheduler part of a Wan 2.1 diffusers pipeline folder (UniPC on shifted flow sigmas)
WAN = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
       "flow_shift": 3.0, "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
       "final_sigmas_type": "zero", "timestep_spacing": "linspace", "num_train_timesteps": 1000}
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
ALPHAS_CUMPROD = np.asarray(make_schedule().alphas_cumprod, np.float32)  # SD1.5's table, for the toy models


def toy_output(x, t, prediction_type, xp):
    """A smooth, slightly nonlinear stand-in for a trained model at integer timestep t, of the right scale for
    its prediction type (x0 predictions stay O(1)); ``xp`` is numpy or jax.numpy."""
    wiggle = 0.05 * xp.tanh(x) * xp.cos(xp.asarray(t, xp.float32) / 200.0)
    if prediction_type == "flow_prediction":
        return 0.9 * x + wiggle
    abar = xp.asarray(ALPHAS_CUMPROD)[t]
    alpha, sigma = xp.sqrt(abar), xp.sqrt(1 - abar)
    # 0.8: with the best model for unit-variance data (1.0) x0 = (x - sigma eps) / alpha cancels to 1 part in
    # 1 / abar = 200 at t = 999, which would amplify the float32 tables' difference (diffusers builds abar in float32,
    # jaxvc in float64: 3e-7 of sigma) 200-fold; here x0 stays O(1) without that cancellation
    eps = 0.8 * sigma * x + wiggle
    if prediction_type == "epsilon":
        return eps
    return alpha * eps - sigma * (x - sigma * eps) / alpha  # v = alpha eps - sigma x0


def reference_loop(scheduler_cls, config, steps, x_T, noises=None):
    scheduler = scheduler_cls.from_config(config)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)  # as Wan's pipelines do: with repeated timesteps the lookup would skip one
    prediction_type = scheduler.config.prediction_type
    x, samples = torch.from_numpy(x_T.copy()), []
    for i, t in enumerate(scheduler.timesteps):
        out = torch.from_numpy(np.asarray(toy_output(x.numpy(), int(t), prediction_type, np), np.float32))
        kwargs = {} if noises is None else {"variance_noise": torch.from_numpy(noises[i])}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        samples.append(x.numpy())
    return scheduler, np.stack(samples)


CASES = {
    "dpm++2m": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler, SD15),
    "dpm++2m-karras": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler, {**SD15, "use_karras_sigmas": True}),
    "dpm++2m-v": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler, {**SD15, "prediction_type": "v_prediction"}),
    "dpm++3m": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler, {**SD15, "solver_order": 3}),
    "dpm++2m-heun-leading": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler,
                             {**SD15, "solver_type": "heun", "timestep_spacing": "leading", "steps_offset": 1}),
    "dpm++2m-trailing-sigma-min": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler,
                                   {**SD15, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    "dpm++2m-euler-at-final": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler,
                               {**SD15, "euler_at_final": True, "lower_order_final": False,
                                "final_sigmas_type": "sigma_min"}),
    "dpm++2m-flow": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler, FLOW),
    "dpm++2m-cosine-clipped-karras": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler,
                                      {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                                       "use_karras_sigmas": True}),
    "dpm++2m-cosine-clipped": (DPMSolverSampler, diffusers.DPMSolverMultistepScheduler,
                               {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}),
    "unipc": (UniPCSampler, diffusers.UniPCMultistepScheduler, SD15),
    "unipc-karras": (UniPCSampler, diffusers.UniPCMultistepScheduler, {**SD15, "use_karras_sigmas": True}),
    "unipc-karras-sigma-range": (UniPCSampler, diffusers.UniPCMultistepScheduler,
                                 {**SD15, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0}),
    "unipc-v-order3": (UniPCSampler, diffusers.UniPCMultistepScheduler,
                       {**SD15, "prediction_type": "v_prediction", "solver_order": 3}),
    "unipc-bh1": (UniPCSampler, diffusers.UniPCMultistepScheduler,
                  {**SD15, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "unipc-noise-prediction": (UniPCSampler, diffusers.UniPCMultistepScheduler,
                               {**SD15, "predict_x0": False, "final_sigmas_type": "sigma_min"}),
    "unipc-corrector-off": (UniPCSampler, diffusers.UniPCMultistepScheduler, {**SD15, "disable_corrector": [0, 2]}),
    "unipc-wan": (UniPCSampler, diffusers.UniPCMultistepScheduler, WAN),
    "unipc-wan-shift5": (UniPCSampler, diffusers.UniPCMultistepScheduler, {**WAN, "flow_shift": 5.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_step_matches_diffusers(case):
    ours_cls, theirs_cls, config = CASES[case]
    x_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    prediction_type = config.get("prediction_type", "epsilon")
    for steps in (1, 2, 7, 25):
        scheduler, expected = reference_loop(theirs_cls, config, steps, x_T)
        sampler = ours_cls.from_diffusers_config(config, steps)
        np.testing.assert_array_equal(sampler.timesteps, scheduler.timesteps.numpy())
        sigma_error = np.abs(sampler.sigmas - scheduler.sigmas.numpy()) / np.maximum(scheduler.sigmas.numpy(), 1e-3)
        assert sigma_error.max() < TOL, (case, steps, sigma_error.max())
        model = lambda x, t, i: toy_output(x, t, prediction_type, jnp)  # noqa: E731
        _, inter = jax.jit(lambda x: sample(model, x, sampler, return_intermediates=True))(jnp.asarray(x_T))
        error = np.abs(np.asarray(inter["samples"]) - expected).max() / np.abs(expected).max()
        assert error < TOL, (case, steps, error)


def test_sde_variant_matches_diffusers_with_the_same_noise():
    config = {**SD15, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    rng = jax.random.key(7)
    for steps in (3, 20):
        noises = np.stack([np.asarray(step_noise(rng, i, SHAPE)) for i in range(steps)])
        _, expected = reference_loop(diffusers.DPMSolverMultistepScheduler, config, steps, x_T, noises)
        sampler = DPMSolverSampler.from_diffusers_config(config, steps)
        assert sampler.needs_noise
        model = lambda x, t, i: toy_output(x, t, "epsilon", jnp)  # noqa: E731
        _, inter = sample(model, jnp.asarray(x_T), sampler, rng=rng, return_intermediates=True)
        error = np.abs(np.asarray(inter["samples"]) - expected).max() / np.abs(expected).max()
        assert error < TOL, (steps, error)
        with pytest.raises(ValueError, match="rng"):
            sample(model, jnp.asarray(x_T), sampler)


# ---------------------------------------------------------------- order of accuracy on exactly solvable data

DATA_STD = 0.5  # x0 ~ N(0, 0.5^2): the noisy marginals are Gaussian, the best model is linear, the ODE exact


def vp_std(sigma):
    """std of x_t for the VP sigma (alpha = 1 / sqrt(1 + sigma^2), noise std = sigma alpha)."""
    alpha = 1 / np.sqrt(1 + sigma ** 2)
    return np.sqrt(alpha ** 2 * DATA_STD ** 2 + (sigma * alpha) ** 2)


def flow_std(sigma):
    return np.sqrt((1 - sigma) ** 2 * DATA_STD ** 2 + sigma ** 2)


def trajectory_error(sampler, flow: bool, min_sigma: float = 0.0) -> float:
    """max_i |x_i - exact x_i| over the steps before the last (which lands on sigma 0 from the posterior mean, the
    same for every solver), where the exact probability-flow ODE keeps x / std(x_t) constant. The model is the
    best one at each step's own sigma (Karras sigmas are not at integer timesteps)."""
    sigmas = jnp.asarray(sampler.sigmas, jnp.float32)

    def vp_eps(x, t, step_index):
        alpha = 1 / jnp.sqrt(1 + sigmas[step_index] ** 2)
        noise_std = sigmas[step_index] * alpha
        return noise_std * x / (alpha ** 2 * DATA_STD ** 2 + noise_std ** 2)

    def flow_velocity(x, t, step_index):
        s = sigmas[step_index]
        return x * (s - (1 - s) * DATA_STD ** 2) / ((1 - s) ** 2 * DATA_STD ** 2 + s ** 2)

    x_T = jnp.linspace(-2.0, 2.0, 64)
    _, inter = sample(flow_velocity if flow else vp_eps, x_T, sampler, return_intermediates=True)
    std = flow_std if flow else vp_std
    start = std(float(sampler.sigmas[0]))
    return max(float(np.abs(np.asarray(inter["samples"][i]) - np.asarray(x_T) * std(float(sigma)) / start).max())
               for i, sigma in enumerate(sampler.sigmas[1:-1]) if sigma >= min_sigma)


def test_orders_of_accuracy_on_gaussian_data():
    """On Karras sigmas: the first-order solver (DDIM's update in DPM-Solver's form) converges as 1/n, DPM-Solver++
    2M as 1/n^2, UniPC-2 as 1/n^3 (its corrector adds one order; without it, it is DPM-Solver++ 2M exactly)."""
    schedule = make_schedule()
    samplers = {
        "first order": lambda n: DPMSolverSampler(schedule, n, solver_order=1, use_karras_sigmas=True),
        "dpm++2m": lambda n: DPMSolverSampler(schedule, n, use_karras_sigmas=True),
        "unipc": lambda n: UniPCSampler(schedule, n, use_karras_sigmas=True),
        "unipc without corrector": lambda n: UniPCSampler(schedule, n, use_karras_sigmas=True,
                                                          disable_corrector=range(n)),
    }
    errors = {name: np.array([trajectory_error(build(n), flow=False) for n in (20, 40, 80)])
              for name, build in samplers.items()}
    rates = {name: np.log2(e[0] / e[-1]) / 2 for name, e in errors.items()}  # per doubling of the steps
    assert 0.8 < rates["first order"] < 1.2, rates
    assert 1.7 < rates["dpm++2m"] < 2.5, rates
    assert rates["unipc"] > 2.6, rates
    np.testing.assert_allclose(errors["unipc without corrector"], errors["dpm++2m"], rtol=1e-4)


def test_multistep_solvers_beat_euler_on_flow_sigmas():
    """Wan's setting (shift 3, 20 steps): UniPC and DPM-Solver++ land far closer to the exact trajectory than Euler
    (compared where sigma >= 0.2: towards sigma 0, linear-in-sigma steps are not small in log-SNR time)."""
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    euler = trajectory_error(FlowMatchEulerSampler(20, shift=3.0), flow=True, min_sigma=0.2)
    for sampler in (DPMSolverSampler(None, 20, **flow), UniPCSampler(None, 20, **flow)):
        assert trajectory_error(sampler, flow=True, min_sigma=0.2) < euler / 5, type(sampler).__name__


# ---------------------------------------------------------------- the switch and its errors

def test_sampler_switch_and_its_errors():
    assert set(sampler_names(flow=True)) == {"euler", "dpm++", "dpm++-sde", "unipc"}
    assert set(sampler_names(flow=False)) == set(SAMPLERS) - {"euler"}
    vp = {**SD15, "timestep_spacing": "linspace", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
    karras = make_sampler("dpm++-karras", vp, 20)
    assert isinstance(karras, DPMSolverSampler) and karras.use_karras_sigmas and karras.solver_order == 2
    assert isinstance(make_sampler("ddim", vp, 20, eta=1.0), DDIMSampler)
    wan = make_sampler("unipc", None, 30, flow_shift=3.0)
    np.testing.assert_array_equal(wan.timesteps, UniPCSampler.from_diffusers_config(WAN, 30).timesteps)
    with pytest.raises(ValueError, match="does not run a flow-matching"):
        make_sampler("dpm++-karras", None, 20, flow_shift=3.0)
    with pytest.raises(ValueError, match="does not run a DDPM-schedule"):
        make_sampler("euler", vp, 20)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("unipc", vp, 20, eta=0.5)
    with pytest.raises(ValueError, match="not one of"):
        make_sampler("plms", vp, 20)
    with pytest.raises(ValueError, match="thresholding"):
        DPMSolverSampler.from_diffusers_config({**SD15, "thresholding": True}, 20)
    with pytest.raises(ValueError, match="solver_p"):
        UniPCSampler.from_diffusers_config({**SD15, "solver_p": "x"}, 20)
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverSampler.from_diffusers_config({**SD15, "algorithm_type": "dpmsolver"}, 20)
    with pytest.raises(ValueError, match="traced"):  # inside jit the coefficients need a host schedule
        jax.jit(lambda: UniPCSampler(make_schedule(), 5).timesteps)()
    jax.jit(lambda: UniPCSampler(make_schedule(host=True), 5).timesteps)()
    with pytest.raises(ValueError, match="flow sigmas"):
        UniPCSampler(make_schedule(), 20, use_flow_sigmas=True)
    # a second-order step onto sigma 0 is undefined (diffusers returns NaN there): refused when built
    with pytest.raises(ValueError, match="not finite.*lower_order_final"):
        UniPCSampler(make_schedule(), 20, lower_order_final=False)
