"""Samplers by name, the one switch ``jaxvc generate --sampler`` and the pipelines use.

    sampler = make_sampler("dpm++-karras", scheduler_config, 25)           # a VP (UNet) model's scheduler config
    sampler = make_sampler("unipc", None, 50, flow_shift=3.0)               # a flow-matching (Wan DiT) model

| name               | what                                              | diffusers scheduler                         |
|--------------------|---------------------------------------------------|---------------------------------------------|
| `ddim`             | DDIM, eta from `--eta` (VP only)                  | `DDIMScheduler`                             |
| `euler`            | flow-matching Euler (flow only)                   | `FlowMatchEulerDiscreteScheduler`           |
| `dpm++`            | DPM-Solver++ 2M                                   | `DPMSolverMultistepScheduler`               |
| `dpm++-karras`     | DPM-Solver++ 2M on Karras sigmas (VP only)        | ... `use_karras_sigmas=True`                |
| `dpm++-sde`        | DPM-Solver++ 2M SDE (noise at every step)         | ... `algorithm_type="sde-dpmsolver++"`      |
| `dpm++-sde-karras` | the same on Karras sigmas (VP only)               |                                             |
| `unipc`            | UniPC, order 2, bh2 (Wan's pipelines ship it)     | `UniPCMultistepScheduler`                   |
| `unipc-karras`     | UniPC on Karras sigmas (VP only)                  | ... `use_karras_sigmas=True`                |

A VP model's scheduler config (its beta schedule, prediction type, timestep spacing) is read as diffusers'
``from_config`` would read it into that scheduler. For a flow model the sigmas are the method's shift.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

# name -> (module:class, overrides of the scheduler config, runs on VP schedules, runs on flow sigmas). Classes are
# imported when a sampler is made, so that this table (``jaxvc generate --help``'s choices) needs no jax.
SAMPLERS: dict[str, tuple[str, dict, bool, bool]] = {
    "ddim": ("ddim:DDIMSampler", {}, True, False),
    "euler": ("flow:FlowMatchEulerSampler", {}, False, True),
    "dpm++": ("dpm_solver:DPMSolverSampler", {"solver_order": 2}, True, True),
    "dpm++-karras": ("dpm_solver:DPMSolverSampler", {"solver_order": 2, "use_karras_sigmas": True}, True, False),
    "dpm++-sde": ("dpm_solver:DPMSolverSampler", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
                  True, True),
    "dpm++-sde-karras": ("dpm_solver:DPMSolverSampler", {"solver_order": 2, "algorithm_type": "sde-dpmsolver++",
                                                         "use_karras_sigmas": True}, True, False),
    "unipc": ("unipc:UniPCSampler", {"solver_order": 2}, True, True),
    "unipc-karras": ("unipc:UniPCSampler", {"solver_order": 2, "use_karras_sigmas": True}, True, False),
}


# a diffusers scheduler class a model folder may ship -> the jaxvc sampler that reads its config as is
# (``from_scheduler_config``; the UNet pipelines sample with their methods' DDIM settings instead)
DIFFUSERS_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": "flow:FlowMatchEulerSampler",
                        "DPMSolverMultistepScheduler": "dpm_solver:DPMSolverSampler",
                        "UniPCMultistepScheduler": "unipc:UniPCSampler"}


def _sampler_class(where: str) -> type:
    module, class_name = where.split(":")
    return getattr(importlib.import_module(f"jaxvc.diffusion.{module}"), class_name)


def from_scheduler_config(config: Mapping[str, Any], num_inference_steps: int):
    """The sampler of a model folder's own scheduler config (its ``_class_name``), every setting as it is."""
    kind = config.get("_class_name")
    if kind not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"scheduler {kind!r} is not one of {sorted(DIFFUSERS_SCHEDULERS)}; choose a sampler by "
                         f"name (one of {sorted(SAMPLERS)})")
    return _sampler_class(DIFFUSERS_SCHEDULERS[kind]).from_diffusers_config(config, num_inference_steps)


def sampler_names(flow: bool) -> list[str]:
    return [name for name, (_, _, vp, fl) in SAMPLERS.items() if (fl if flow else vp)]


def make_sampler(name: str, scheduler_config: Mapping[str, Any] | None, num_inference_steps: int, *,
                 eta: float = 0.0, flow_shift: float | None = None, num_train_timesteps: int = 1000):
    """The sampler ``name`` for a VP model (``scheduler_config``: its diffusers scheduler config) or, with
    ``flow_shift``, for a flow-matching model (velocity outputs, sigmas shifted by ``flow_shift``)."""
    flow = flow_shift is not None
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not one of {sorted(SAMPLERS)}")
    where, overrides, vp_ok, flow_ok = SAMPLERS[name]
    if not (flow_ok if flow else vp_ok):
        kind = "flow-matching (velocity)" if flow else "DDPM-schedule (epsilon/v)"
        raise ValueError(f"sampler {name!r} does not run a {kind} model; choose one of {sampler_names(flow)}")
    if eta and name != "ddim":
        raise ValueError(f"eta={eta} is DDIM's; the {name!r} sampler is deterministic or draws its own noise")
    cls = _sampler_class(where)
    if name == "ddim":
        return cls.from_diffusers_config(scheduler_config, num_inference_steps, eta=float(eta))
    if name == "euler":
        return cls(num_inference_steps, shift=flow_shift, num_train_timesteps=num_train_timesteps)
    if flow:
        config = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": float(flow_shift),
                  "num_train_timesteps": num_train_timesteps}
    else:
        config = dict(scheduler_config)
        for key in ("use_karras_sigmas", "algorithm_type", "solver_type"):  # the name decides these
            config.pop(key, None)
    return cls.from_diffusers_config({**config, **overrides}, num_inference_steps)
