"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095): "DPM++ 2M" (Karras), "DPM++ 2M SDE", and 3M.

    sampler = DPMSolverSampler.from_diffusers_config("/models/sd15/scheduler", 25, use_karras_sigmas=True)
    video_latents = sample(classifier_free_guidance(model, 7.5), x_T, sampler)

The semantics are diffusers' ``DPMSolverMultistepScheduler`` (algorithm "dpmsolver++" or "sde-dpmsolver++",
midpoint or Heun second-order terms, lower-order warm-up and final steps, final sigma 0 or sigma_min), on a VP
schedule (epsilon, v or x0 models: the UNets) or on flow-matching sigmas (``use_flow_sigmas``, velocity models:
the Wan DiT). The update is written in log-SNR time lambda = log(alpha / sigma), h = lambda_next - lambda; with the
data predictions D0 = m_i and the divided differences D1 = (m_i - m_{i-1}) / r0, r0 = h_prev / h:

    x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D0 - 1/2 alpha_next (e^-h - 1) D1      (2M, midpoint)

This file only builds the per-step coefficients (``multistep.StepTables``); the device step is shared.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np

from jaxvc.diffusion.multistep import (MultistepSampler, StepTables, alpha_sigma_lambda, check_choice, data_conversion,
                                       host_alphas_cumprod, karras_sigmas, shift_flow, sigma_to_t, spaced_timesteps,
                                       vp_sigma_table)
from jaxvc.diffusion.schedule import NoiseSchedule, load_scheduler_config, schedule_from_diffusers_config

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hash by identity (it holds arrays)
class DPMSolverSampler(MultistepSampler):
    """Field defaults are diffusers' ``DPMSolverMultistepScheduler`` defaults. ``schedule`` is the VP noise table
    (needed unless ``use_flow_sigmas``; concrete: ``make_schedule(..., host=True)`` inside jit).
    ``algorithm_type="sde-dpmsolver++"`` draws noise at every step."""

    schedule: NoiseSchedule | None
    num_inference_steps: int
    solver_order: int = 2
    prediction_type: str = "epsilon"
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    num_train_timesteps: int = 1000
    rescale_betas_zero_snr: bool = False
    round_karras_timesteps: bool = True  # diffusers keeps them fractional (then truncates) for the cosine schedule

    def __post_init__(self):
        check_choice("algorithm_type", self.algorithm_type, ALGORITHMS)
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        self._check_sigma_options()
        if self.schedule is None and (not self.use_flow_sigmas or self.final_sigmas_type == "sigma_min"):
            raise ValueError("DPMSolverSampler: pass the VP schedule (schedule=) for these sigmas")
        self.tables  # validates the step count and the coefficients early

    @property
    def history_size(self) -> int:
        return max(self.solver_order - 1, 1)

    def _vp_alphas_cumprod(self) -> np.ndarray:
        return host_alphas_cumprod(self.schedule, self.rescale_betas_zero_snr, type(self).__name__)

    def _sigmas(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (timesteps (n,) int64, sigmas (n + 1,) float32), as ``DPMSolverMultistepScheduler.set_timesteps``."""
        n = self.num_inference_steps
        if self.use_flow_sigmas:
            sigmas = 1.0 - np.linspace(1, 1 / self.num_train_timesteps, n + 1)
            sigmas = np.flip(shift_flow(sigmas, self.flow_shift))[:-1].copy()
            timesteps = sigmas * self.num_train_timesteps
        else:
            ac = self._vp_alphas_cumprod()
            table = vp_sigma_table(ac)
            lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
            clipped = int(np.searchsorted(np.flip(lambdas), self.lambda_min_clipped))
            timesteps = spaced_timesteps(n, self.timestep_spacing, num_train_timesteps=len(ac),
                                         steps_offset=self.steps_offset, last_timestep=len(ac) - clipped)
            if self.use_karras_sigmas:
                sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
                timesteps = sigma_to_t(sigmas, np.log(table))
                timesteps = timesteps.round() if self.round_karras_timesteps else timesteps
            else:
                sigmas = np.interp(timesteps, np.arange(len(table)), table)
        # sigma_min is the VP table's first sigma, with flow sigmas too (as diffusers has it)
        last = 0.0 if self.final_sigmas_type == "zero" else float(vp_sigma_table(self._vp_alphas_cumprod())[0])
        return np.asarray(timesteps).astype(np.int64), np.concatenate([sigmas, [last]]).astype(np.float32)

    def _orders(self, n: int) -> np.ndarray:
        orders = []
        for i in range(n):
            warm = min(i, self.solver_order)  # diffusers' lower_order_nums
            final = i == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15)
                                    or self.final_sigmas_type == "zero")
            second = i == n - 2 and self.lower_order_final and n < 15
            if self.solver_order == 1 or warm < 1 or final:
                orders.append(1)
            elif self.solver_order == 2 or warm < 2 or second:
                orders.append(2)
            else:
                orders.append(3)
        return np.asarray(orders)

    def _build_tables(self) -> StepTables:
        timesteps, sigmas = self._sigmas()
        n, width = len(timesteps), self.history_size + 1
        alpha, sigma, lam = alpha_sigma_lambda(sigmas, self.use_flow_sigmas)
        orders = self._orders(n)
        conv = np.array([data_conversion(self.prediction_type, alpha[i], sigma[i], float(sigmas[i]))
                         for i in range(n)])
        pred_x, pred_w, noise_w = np.zeros(n), np.zeros((n, width)), np.zeros(n)
        sde = self.algorithm_type == "sde-dpmsolver++"
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(n):
                a_t, s_t, s_s = alpha[i + 1], sigma[i + 1], sigma[i]
                h = lam[i + 1] - lam[i]
                unit = np.eye(width)
                d0 = unit[0]                       # D0 = m_i; D1, D2: divided differences over M = [m_i, ...]
                if orders[i] >= 2:
                    r0 = (lam[i] - lam[i - 1]) / h
                    d1_0 = (unit[0] - unit[1]) / r0
                if orders[i] == 3:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    d1_1 = (unit[1] - unit[2]) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                if not sde:
                    em1 = math.expm1(-h) if np.isfinite(h) else -1.0   # e^-h - 1
                    pred_x[i] = s_t / s_s
                    w = -a_t * em1 * d0
                    if orders[i] == 2:
                        w = w + (-0.5 * a_t * em1 if self.solver_type == "midpoint"
                                 else a_t * (em1 / h + 1.0)) * d1_0
                    elif orders[i] == 3:
                        w = w + a_t * (em1 / h + 1.0) * d1 - a_t * ((em1 + h) / h ** 2 - 0.5) * d2
                else:
                    e2 = -math.expm1(-2.0 * h) if np.isfinite(h) else 1.0   # 1 - e^-2h
                    pred_x[i] = s_t / s_s * math.exp(-h)
                    noise_w[i] = s_t * math.sqrt(e2)
                    w = a_t * e2 * d0
                    if orders[i] == 2:
                        w = w + (0.5 * a_t * e2 if self.solver_type == "midpoint"
                                 else a_t * (e2 / (-2.0 * h) + 1.0)) * d1_0
                    elif orders[i] == 3:
                        w = w + a_t * (e2 / (-2.0 * h) + 1.0) * d1 + a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
                pred_w[i] = w
        return StepTables(timesteps=timesteps, sigmas=sigmas, orders=orders, conv_x=conv[:, 0], conv_out=conv[:, 1],
                          x0_x=conv[:, 0], x0_out=conv[:, 1], use_corrector=np.zeros(n, bool),
                          corr_last=np.zeros(n), corr_w=np.zeros((n, width)), pred_x=pred_x, pred_w=pred_w,
                          noise_w=noise_w)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | os.PathLike, num_inference_steps: int,
                              **overrides) -> "DPMSolverSampler":
        """From a diffusers scheduler config (dict, json file or folder: a DPMSolverMultistepScheduler's, or any
        other's, whose keys this one lacks take DPMSolverMultistepScheduler's defaults, as ``from_config`` does).
        Options jaxvc does not implement are refused by name."""
        cfg = {**load_scheduler_config(config), **overrides}
        if cfg.get("algorithm_type") == "deis":
            cfg["algorithm_type"] = "dpmsolver++"  # diffusers maps DEIS's algorithm so
        algorithm = cfg.get("algorithm_type", "dpmsolver++")
        fields = cls._config_fields(cfg, ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                                          "variance_type", "use_dynamic_shifting"),
                                    {} if algorithm in ALGORITHMS else {"algorithm_type": algorithm})
        if fields.get("solver_type") in ("logrho", "bh1", "bh2"):
            fields["solver_type"] = "midpoint"  # diffusers maps UniPC's/DEIS's solver types so
        if fields.get("lambda_min_clipped") is None:
            fields.pop("lambda_min_clipped", None)
        fields.setdefault("round_karras_timesteps", cfg.get("beta_schedule", "linear") != "squaredcos_cap_v2")
        return cls(schedule=schedule_from_diffusers_config(cfg, host=True), num_inference_steps=num_inference_steps,
                   **fields)
