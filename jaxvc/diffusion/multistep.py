"""Multistep exponential-integrator samplers (DPM-Solver++, UniPC) as one table-driven step, and the sigma tables
they share with diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler``.

Each of these solvers updates the sample by a linear combination of the current sample, the model output at this
step, the solver's model outputs (data or noise predictions) of earlier steps and, for UniPC's corrector, the sample
before the last step. With M = [m_i, m_{i-1}, ...] (newest first):

    m_i     = conv_x[i] x_i + conv_out[i] F(x_i, t_i)                    the model output in the solver's terms
    x_i'    = corr_last[i] x_{i-1}' + sum_k corr_w[i, k] M[k]           UniPC's corrector (where use_corrector[i])
    x_{i+1} = pred_x[i] x_i' + sum_k pred_w[i, k] M[k] + noise_w[i] z_i

The coefficients depend only on the noise schedule and the step count, so ``dpm_solver.py`` and ``unipc.py``
compute them once on the host in float64 (the orders per step, the warm-up and the lower-order final steps
included) and the device step is a few fused multiply-adds inside ``sampling.sample``'s ``lax.scan``, whose carry
holds (x_{i-1}', M without its oldest entry). A sampler of this kind has ``init_state``; ``sample`` checks for it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclasses.dataclass(frozen=True)
class StepTables:
    """Per-step coefficients (host float64 arrays; n steps, a history of K earlier model outputs)."""

    timesteps: np.ndarray       # (n,) int64, model-facing, descending
    sigmas: np.ndarray          # (n + 1,) float32, the schedule's sigmas (VP: sqrt((1 - abar) / abar); flow: sigma)
    orders: np.ndarray          # (n,) the order of each step's update (for reports and tests)
    conv_x: np.ndarray          # (n,)
    conv_out: np.ndarray        # (n,)
    x0_x: np.ndarray            # (n,) the data prediction, for return_intermediates
    x0_out: np.ndarray          # (n,)
    use_corrector: np.ndarray   # (n,) bool
    corr_last: np.ndarray       # (n,)
    corr_w: np.ndarray          # (n, K + 1)
    pred_x: np.ndarray          # (n,)
    pred_w: np.ndarray          # (n, K + 1)
    noise_w: np.ndarray         # (n,)

    def check_finite(self, name: str) -> None:
        for field in dataclasses.fields(self):
            values = np.asarray(getattr(self, field.name))
            if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                step = int(np.argwhere(~np.isfinite(values.reshape(values.shape[0], -1)))[0, 0])
                raise ValueError(f"{name}: the coefficient {field.name} of step {step} is not finite (sigmas "
                                 f"{self.sigmas[step]} -> {self.sigmas[step + 1]}, order {self.orders[step]}); "
                                 "a step of order > 1 onto sigma 0, or between equal sigmas (Karras sigmas with "
                                 "final_sigmas_type='sigma_min'), is undefined: keep lower_order_final on, or "
                                 "final_sigmas_type='zero'")


class MultistepSampler:
    """The device side shared by ``DPMSolverSampler`` and ``UniPCSampler``: subclasses define ``tables`` and
    ``history_size``. Protocol of ``jaxvc.diffusion.sampling.sample``, plus ``init_state``."""

    history_size: int

    @functools.cached_property
    def tables(self) -> StepTables:
        tables = self._build_tables()
        tables.check_finite(type(self).__name__)
        return tables

    def _build_tables(self) -> StepTables:
        raise NotImplementedError

    def _check_sigma_options(self) -> None:
        """The checks both samplers' sigma options share (their fields of the same names)."""
        name = type(self).__name__
        check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.use_karras_sigmas and self.use_flow_sigmas:
            raise ValueError(f"{name}: use_karras_sigmas and use_flow_sigmas exclude each other")
        if self.use_flow_sigmas != (self.prediction_type == "flow_prediction"):
            raise ValueError(f"{name}: flow sigmas go with prediction_type='flow_prediction' and only with it "
                             f"(got use_flow_sigmas={self.use_flow_sigmas}, prediction_type={self.prediction_type!r})")

    @classmethod
    def _config_fields(cls, cfg: dict, unsupported_keys, unsupported: dict | None = None) -> dict:
        """The fields of ``cls`` a diffusers scheduler config sets; options jaxvc does not implement (set in
        ``unsupported_keys``, or passed in ``unsupported``) are refused by name."""
        unsupported = {**{k: cfg[k] for k in unsupported_keys if cfg.get(k)}, **(unsupported or {})}
        if unsupported:
            raise ValueError(f"{cls.__name__}: scheduler config options {unsupported} are not supported")
        return {f.name: cfg[f.name] for f in dataclasses.fields(cls)
                if f.name in cfg and f.name not in ("schedule", "num_inference_steps")}

    @property
    def timesteps(self) -> np.ndarray:
        return self.tables.timesteps

    @property
    def sigmas(self) -> np.ndarray:
        return self.tables.sigmas

    @property
    def needs_noise(self) -> bool:
        return bool(np.any(self.tables.noise_w != 0))

    def init_state(self, x):
        """(the corrected sample of the previous step, the K previous model outputs): zeros before step 0, where
        every coefficient that reads them is 0."""
        return jnp.zeros_like(x), jnp.zeros((self.history_size,) + x.shape, x.dtype)

    def step(self, model_out, step_index, x, noise=None, state=None):
        """-> (x_{i+1}, the data prediction at x_i, the new state). Computed in float32 (diffusers upcasts too)."""
        if state is None:
            raise ValueError(f"{type(self).__name__} is a multistep sampler: pass state= (init_state(x) at step 0)")
        tables = self.tables
        at = lambda values: jnp.asarray(values, jnp.float32)[step_index]  # noqa: E731
        previous, history = state
        x32, out32 = x.astype(jnp.float32), model_out.astype(jnp.float32)
        m_new = at(tables.conv_x) * x32 + at(tables.conv_out) * out32
        pred_x0 = at(tables.x0_x) * x32 + at(tables.x0_out) * out32
        outputs = jnp.concatenate([m_new[None], history.astype(jnp.float32)], axis=0)  # (K + 1, *x.shape)

        def combine(weights):
            return jnp.tensordot(jnp.asarray(weights, jnp.float32)[step_index], outputs, axes=1)

        if np.any(tables.use_corrector):
            corrected = at(tables.corr_last) * previous.astype(jnp.float32) + combine(tables.corr_w)
            x32 = jnp.where(jnp.asarray(tables.use_corrector)[step_index], corrected, x32)
        x_next = at(tables.pred_x) * x32 + combine(tables.pred_w)
        if noise is not None:
            x_next = x_next + at(tables.noise_w) * noise.astype(jnp.float32)
        state = (x32.astype(previous.dtype), outputs[:self.history_size].astype(history.dtype))
        return x_next.astype(x.dtype), pred_x0.astype(x.dtype), state


# ---------------------------------------------------------------- sigma tables (diffusers' set_timesteps)

def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def host_alphas_cumprod(schedule, rescale_betas_zero_snr: bool, name: str) -> np.ndarray:
    """The schedule's abar table as a numpy float32 copy (diffusers' last value 2^-24 with the zero-SNR rescale)."""
    try:
        ac = np.asarray(schedule.alphas_cumprod, np.float32).copy()
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{name}: the schedule's tables are traced (made inside jit); make them with "
                         "make_schedule(..., host=True)") from None
    if rescale_betas_zero_snr:
        ac[-1] = 2.0 ** -24  # diffusers: close to 0 so the first sigma is finite
    return ac


def vp_sigma_table(alphas_cumprod) -> np.ndarray:
    """sqrt((1 - abar) / abar) per training timestep, in float32 as diffusers builds it."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return np.sqrt((np.float32(1) - ac) / ac)


def spaced_timesteps(num_inference_steps: int, spacing: str, *, num_train_timesteps: int, steps_offset: int = 0,
                     last_timestep: int | None = None) -> np.ndarray:
    """The multistep schedulers' integer timesteps (int64, descending); ``last_timestep`` is DPM-Solver's
    lambda-clipped end (the number of training timesteps unless ``lambda_min_clipped`` is set)."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_inference_steps + 1)
        return (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    ratio = num_train_timesteps / num_inference_steps
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


def sigma_to_t(sigma, log_sigmas) -> np.ndarray:
    """The (fractional) training timestep of a sigma: linear in log sigma between the table's neighbours."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022's sigmas, sigma_max -> sigma_min evenly in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def shift_flow(sigmas, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def alpha_sigma_lambda(sigmas, flow: bool):
    """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t) in float64 for a sigma table; a final sigma of 0
    gives lambda = inf, which the order-1 final step turns into x0 exactly."""
    s = np.asarray(sigmas, np.float64)
    if flow:
        alpha, sigma = 1.0 - s, s
    else:
        alpha = 1.0 / np.sqrt(s ** 2 + 1.0)
        sigma = s * alpha
    with np.errstate(divide="ignore"):
        return alpha, sigma, np.log(alpha) - np.log(sigma)


def data_conversion(prediction_type: str, alpha: float, sigma: float, flow_sigma: float) -> tuple[float, float]:
    """(coefficient of x, of the model output) giving the data prediction x0."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "flow_prediction":
        return 1.0, -flow_sigma
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type={prediction_type!r} is not one of "
                     "('epsilon', 'v_prediction', 'sample', 'flow_prediction')")
