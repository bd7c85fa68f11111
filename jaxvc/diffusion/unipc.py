"""UniPC multistep (Zhao et al. 2023, arXiv 2302.04867): a predictor (UniP) and a corrector (UniC) per step.

    sampler = UniPCSampler.from_diffusers_config("/models/Wan2.1-T2V-1.3B-Diffusers/scheduler", 50)
    latents = sample(classifier_free_guidance(model, 5.0), x_T, sampler)

The semantics are diffusers' ``UniPCMultistepScheduler``, the scheduler Wan's pipeline folders ship (flow sigmas
with ``flow_shift``, ``prediction_type="flow_prediction"``, order 2, B(h) = e^h - 1 ("bh2")); it also runs VP
schedules (epsilon, v or x0 models). At step i the model sees x_i; before the predictor, the corrector replaces x_i
by a UniC update from x_{i-1}' that uses the model output at x_i as well (free: that output exists anyway):

    UniP-p:  x_{i+1} = (sigma_{i+1} / sigma_i) x_i' - alpha_{i+1} (e^-h - 1) m_i
                       - alpha_{i+1} B(h) sum_k rho_k (m_{i-k} - m_i) / r_k,         r_k = (lambda_{i-k} - lambda_i) / h
    UniC-p:  the same from x_{i-1}' over h_{i-1}, plus rho_p (m_i - m_{i-1}); the rho solve R rho = b (order 1: 1/2)

with m the data predictions (``predict_x0``; or noise predictions, alpha and sigma swapped, if false). The orders
warm up (1, 2, ...) and fall at the end (``lower_order_final``). This file only builds the per-step coefficients
(``multistep.StepTables``); the device step is shared with DPM-Solver++.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxvc.diffusion.multistep import (MultistepSampler, StepTables, alpha_sigma_lambda, check_choice, data_conversion,
                                       host_alphas_cumprod, karras_sigmas, shift_flow, sigma_to_t, spaced_timesteps,
                                       vp_sigma_table)
from jaxvc.diffusion.schedule import NoiseSchedule, load_scheduler_config, schedule_from_diffusers_config

SOLVER_TYPES = ("bh1", "bh2")


def _noise_conversion(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(coefficient of x, of the model output) giving the noise prediction (``predict_x0=False``)."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "sample":
        return 1.0 / sigma, -alpha / sigma
    if prediction_type == "v_prediction":
        return sigma, alpha
    raise ValueError(f"UniPCSampler: predict_x0=False takes prediction_type 'epsilon', 'sample' or 'v_prediction', "
                     f"not {prediction_type!r}")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash by identity (it holds arrays)
class UniPCSampler(MultistepSampler):
    """Field defaults are diffusers' ``UniPCMultistepScheduler`` defaults. ``schedule`` is the VP noise table
    (needed unless ``use_flow_sigmas``; concrete: ``make_schedule(..., host=True)`` inside jit).
    ``disable_corrector``: steps whose following corrector is skipped."""

    schedule: NoiseSchedule | None
    num_inference_steps: int
    solver_order: int = 2
    prediction_type: str = "epsilon"
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: Sequence[int] = ()
    use_karras_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    num_train_timesteps: int = 1000
    rescale_betas_zero_snr: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None

    def __post_init__(self):
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        if not 1 <= self.solver_order <= 4:
            raise ValueError(f"UniPCSampler: solver_order must be 1..4, got {self.solver_order}")
        self._check_sigma_options()
        if self.schedule is None and not self.use_flow_sigmas:
            raise ValueError("UniPCSampler: pass the VP schedule (schedule=) for these sigmas")
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector or ()))
        self.tables  # validates the step count and the coefficients early

    @property
    def history_size(self) -> int:
        return self.solver_order

    def _sigmas(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (timesteps (n,) int64, sigmas (n + 1,) float32), as ``UniPCMultistepScheduler.set_timesteps``."""
        n = self.num_inference_steps
        if self.use_flow_sigmas:
            sigmas = shift_flow(np.linspace(1, 1 / self.num_train_timesteps, n + 1)[:-1], self.flow_shift)
            if abs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6  # diffusers: keeps log(alpha) finite at the first step
            timesteps = sigmas * self.num_train_timesteps
            last = sigmas[-1]
        else:
            ac = host_alphas_cumprod(self.schedule, self.rescale_betas_zero_snr, type(self).__name__)
            table = vp_sigma_table(ac)
            timesteps = spaced_timesteps(n, self.timestep_spacing, num_train_timesteps=len(ac),
                                         steps_offset=self.steps_offset)
            if self.use_karras_sigmas:
                sigmas = karras_sigmas(float(table[0]) if self.sigma_min is None else self.sigma_min,
                                       float(table[-1]) if self.sigma_max is None else self.sigma_max, n)
                timesteps = sigma_to_t(sigmas, np.log(table)).round()
                last = sigmas[-1]
            else:
                sigmas = np.interp(timesteps, np.arange(len(table)), table)
                last = float(table[0])  # sigma_min
        last = 0.0 if self.final_sigmas_type == "zero" else last
        return np.asarray(timesteps).astype(np.int64), np.concatenate([sigmas, [last]]).astype(np.float32)

    def _orders(self, n: int) -> np.ndarray:
        orders = []
        for i in range(n):
            order = min(self.solver_order, n - i) if self.lower_order_final else self.solver_order
            orders.append(min(order, min(i, self.solver_order) + 1))  # warm-up: 1, 2, ... previous outputs
        return np.asarray(orders)

    def _update(self, lam, alpha, sigma, target: int, start: int, others: Sequence[int], order: int, corrector: bool):
        """The UniP (or UniC) update from step ``start`` to ``target``: (coefficient of the sample at ``start``,
        the data term's e^-h - 1 factor, rho weights per D1 term, B(h), the scale (alpha or sigma at target))."""
        h = lam[target] - lam[start]
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)
        b_h = hh if self.solver_type == "bh1" else math.expm1(hh)
        rks = [(lam[k] - lam[start]) / h for k in others] + [1.0]
        h_phi_k, factorial, rows, b = h_phi_1 / hh - 1.0, 1, [], []
        for i in range(1, order + 1):
            rows.append(np.power(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        rows, b = np.asarray(rows), np.asarray(b)
        if corrector:
            rhos = [0.5] if order == 1 else list(np.linalg.solve(rows, b))
        elif order == 1:
            rhos = []
        else:
            rhos = [0.5] if order == 2 else list(np.linalg.solve(rows[:-1, :-1], b[:-1]))
        if self.predict_x0:
            x_coef, scale = sigma[target] / sigma[start], alpha[target]
        else:
            x_coef, scale = alpha[target] / alpha[start], sigma[target]
        return x_coef, h_phi_1, rks, rhos, b_h, scale

    def _build_tables(self) -> StepTables:
        timesteps, sigmas = self._sigmas()
        n, width = len(timesteps), self.solver_order + 1
        alpha, sigma, lam = alpha_sigma_lambda(sigmas, self.use_flow_sigmas)
        orders = self._orders(n)
        x0 = np.array([data_conversion(self.prediction_type, alpha[i], sigma[i], float(sigmas[i]))
                       for i in range(n)])
        conv = x0 if self.predict_x0 else np.array([_noise_conversion(self.prediction_type, alpha[i], sigma[i])
                                                    for i in range(n)])
        unit = np.eye(width)   # M = [m_i, m_{i-1}, ...]: m_i is unit[0]
        pred_x, pred_w = np.zeros(n), np.zeros((n, width))
        use_corrector, corr_last, corr_w = np.zeros(n, bool), np.zeros(n), np.zeros((n, width))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(n):
                if i > 0 and (i - 1) not in self.disable_corrector:
                    order = int(orders[i - 1])        # UniC-p uses the previous step's order, from x_{i-1}'
                    others = [i - 1 - k for k in range(1, order)]
                    x_coef, h_phi_1, rks, rhos, b_h, scale = self._update(lam, alpha, sigma, i, i - 1, others,
                                                                          order, corrector=True)
                    w = -scale * h_phi_1 * unit[1]
                    for k, (rk, rho) in enumerate(zip(rks[:-1], rhos[:-1]), start=1):
                        w = w - scale * b_h * rho * (unit[k + 1] - unit[1]) / rk
                    w = w - scale * b_h * rhos[-1] * (unit[0] - unit[1])
                    use_corrector[i], corr_last[i], corr_w[i] = True, x_coef, w
                order = int(orders[i])
                if sigmas[i + 1] == 0 and order == 1:
                    # onto sigma 0 every order-1 update tends to the data prediction at x_i' (alpha = 1 there).
                    # diffusers evaluates the limit's terms (inf * 0): NaN with predict_x0=False or "bh1"
                    if self.predict_x0:
                        pred_x[i], pred_w[i] = 0.0, unit[0]
                    else:
                        pred_x[i], pred_w[i] = 1.0 / alpha[i], -sigma[i] / alpha[i] * unit[0]
                    continue
                others = [i - k for k in range(1, order)]
                x_coef, h_phi_1, rks, rhos, b_h, scale = self._update(lam, alpha, sigma, i + 1, i, others, order,
                                                                      corrector=False)
                w = -scale * h_phi_1 * unit[0]
                for k, (rk, rho) in enumerate(zip(rks[:-1], rhos), start=1):
                    w = w - scale * b_h * rho * (unit[k] - unit[0]) / rk
                pred_x[i], pred_w[i] = x_coef, w
        return StepTables(timesteps=timesteps, sigmas=sigmas, orders=orders, conv_x=conv[:, 0], conv_out=conv[:, 1],
                          x0_x=x0[:, 0], x0_out=x0[:, 1], use_corrector=use_corrector, corr_last=corr_last,
                          corr_w=corr_w, pred_x=pred_x, pred_w=pred_w, noise_w=np.zeros(n))

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | os.PathLike, num_inference_steps: int,
                              **overrides) -> "UniPCSampler":
        """From a diffusers scheduler config (dict, json file or folder: Wan's ``scheduler/`` holds a UniPC one;
        any other's keys take UniPCMultistepScheduler's defaults, as ``from_config`` does). Options jaxvc does not
        implement are refused by name."""
        cfg = {**load_scheduler_config(config), **overrides}
        fields = cls._config_fields(cfg, ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "solver_p",
                                          "use_dynamic_shifting", "shift_terminal"))
        if fields.get("solver_type") in ("midpoint", "heun", "logrho"):
            fields["solver_type"] = "bh2"  # diffusers maps DPM-Solver's solver types so
        return cls(schedule=schedule_from_diffusers_config(cfg, host=True), num_inference_steps=num_inference_steps,
                   **fields)
