"""The denoising loop as one ``lax.scan`` (traceable end to end), classifier-free guidance, per-step schedules.

    sampler = DDIMSampler.from_diffusers_config(cfg, 30, timestep_spacing="linspace")   # or FlowMatchEulerSampler
    @jax.jit
    def generate(params, text, x_T, rng):
        def model(x, t, step_index):                       # x: (2B, ...) = [uncond; cond]
            lora_scale = piecewise_constant(step_index, [5], [0.4, 0.8])
            return unet.apply(params, x, jnp.full((x.shape[0],), t), text, lora_scale=lora_scale)
        return sample(classifier_free_guidance(model, 8.0), x_T, sampler, rng=rng, progress=True)

Pass parameters as arguments of the jitted function (as above), not as Python constants, so they are not baked
into the executable. ``denoise_fn(x, t, step_index)`` gets the current sample, the model-facing timestep of this step
(int32 for DDIM, float32 1000*sigma for flow) and the step index 0..n-1 as scalars, so it can compute any per-step
quantity (a guidance scale, a LoRA scale, which frames to keep) with jnp ops.

A sampler is any object with ``timesteps`` (host array, one per step), ``needs_noise`` (bool) and
``step(model_out, step_index, x, noise) -> (prev_sample, pred_original_sample)``: ``DDIMSampler`` and
``FlowMatchEulerSampler``. A multistep sampler (``DPMSolverSampler``, ``UniPCSampler``) also has ``init_state(x)``
and its step takes and returns a state (its earlier model outputs), which the scan carries. Per-step noise is
``step_noise(rng, step_index, ...)``: fold the step index into one key (or into each sample's key), so a run is
reproducible and the noise of any step can be regenerated outside. ``jaxvc.diffusion.samplers.make_sampler`` makes
any of them by name.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def step_noise(rng, step_index, shape, dtype=jnp.float32):
    """The standard-normal noise the loop draws at ``step_index`` (eta > 0 DDIM, stochastic flow). ``rng``: one key,
    or one key per sample of the batch (a key array of shape (B,) for a sample of shape (B, ...)): then each sample
    draws its own noise, the same it would draw alone, so a batch of videos equals the videos made one by one."""
    if jnp.ndim(rng) == 0:
        return jax.random.normal(jax.random.fold_in(rng, step_index), shape, dtype)
    if jnp.shape(rng) != tuple(shape[:1]):
        raise ValueError(f"step_noise: {jnp.shape(rng)[0]} keys for a batch of {shape[0]} samples (one key, or "
                         "one per sample)")
    # (B,) keys -> (B, ...): normal((1, ...)) and normal((...)) draw the same values from one key
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, step_index), tuple(shape[1:]), dtype))(rng)


def piecewise_constant(step_index, boundaries: Sequence[int], values: Sequence[float]):
    """values[k] for boundaries[k-1] <= step_index < boundaries[k] (traceable): e.g. CustomCrafter's LoRA scale
    ``piecewise_constant(i, [5], [0.4, 0.8])`` is 0.4 for the first 5 steps and 0.8 after."""
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"piecewise_constant: need len(values) == len(boundaries) + 1, got {len(values)} values "
                         f"for {len(boundaries)} boundaries")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"piecewise_constant: boundaries must be ascending, got {list(boundaries)}")
    segment = jnp.searchsorted(jnp.asarray(boundaries, jnp.int32), jnp.asarray(step_index, jnp.int32), side="right")
    return jnp.asarray(values, jnp.float32)[segment]


def cfg_combine(cond, uncond, guidance_scale, guidance_rescale: float = 0.0):
    """uncond + w (cond - uncond); with ``guidance_rescale`` > 0 the result's per-example std is pulled toward the
    conditional prediction's (diffusers ``rescale_noise_cfg``, Lin et al. 2023 §3.4)."""
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        axes = tuple(range(1, cond.ndim))
        std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)   # torch .std is unbiased
        std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
        rescaled = guided * (std_cond / std_guided)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def _scale_at(scale, step_index):
    """A guidance scale at this step: a number, or a function of the step index (a per-step schedule)."""
    return scale(step_index) if callable(scale) else scale


def classifier_free_guidance(model_fn: DenoiseFn, guidance_scale, guidance_rescale: float = 0.0) -> DenoiseFn:
    """Wrap a model into a guided ``denoise_fn`` that makes ONE model call on the doubled batch.

    ``model_fn(x2, t, step_index)`` receives x2 = concat([x, x]) (2B, ...) and must condition its first half on
    the unconditional inputs and its second half on the conditional ones (diffusers' order: the caller concatenates
    ``[negative_embeds, prompt_embeds]`` the same way). ``guidance_scale`` is a number or a function of the step
    index (a per-step schedule).
    """
    def denoise(x, t, step_index):
        out = model_fn(jnp.concatenate([x, x], axis=0), t, step_index)   # (2B, ...)
        if out.shape[0] != 2 * x.shape[0]:
            raise ValueError(f"classifier_free_guidance: model returned batch {out.shape[0]} for an input batch of "
                             f"{2 * x.shape[0]} (expected [uncond; cond] stacked on axis 0)")
        uncond, cond = jnp.split(out, 2, axis=0)
        return cfg_combine(cond, uncond, _scale_at(guidance_scale, step_index), guidance_rescale)

    return denoise


def reference_guidance(model_fn: DenoiseFn, text_scale, reference_scale) -> DenoiseFn:
    """Guidance with separate text and reference scales (as InstructPix2Pix's image + text guidance), ONE model call
    on the tripled batch: ``model_fn(x3, t, step_index)`` gets x3 = concat([x, x, x]) (3B, ...) and must condition
    its thirds on (negative text, no reference), (text, no reference), (text, reference). Returns
        uncond + text_scale (text - uncond) + reference_scale (full - text),
    which is plain classifier-free guidance uncond + s (full - uncond) when both scales equal s. A reference scale
    above the text scale pushes the subject's appearance without pushing the caption's layout further.
    Scales are numbers or functions of the step index."""
    def denoise(x, t, step_index):
        out = model_fn(jnp.concatenate([x, x, x], axis=0), t, step_index)   # (3B, ...)
        if out.shape[0] != 3 * x.shape[0]:
            raise ValueError(f"reference_guidance: model returned batch {out.shape[0]} for an input batch of "
                             f"{3 * x.shape[0]} (expected [uncond; text only; text + reference] on axis 0)")
        uncond, text_only, full = jnp.split(out, 3, axis=0)
        text_w, reference_w = _scale_at(text_scale, step_index), _scale_at(reference_scale, step_index)
        return uncond + text_w * (text_only - uncond) + reference_w * (full - text_only)

    return denoise


class _ProgressBar:
    """Host side of progress=True: a tqdm bar per run, driven by the step index (opened at step 0, closed after the
    last step), so it stays right even if two callbacks arrive out of order."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.bar = total, desc, None

    def __call__(self, step_index: int, total: int):
        from tqdm.auto import tqdm

        if step_index == 0 and self.bar is not None:  # a new run while the previous bar is still open
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.desc)
        self.bar.update(max(0, step_index + 1 - self.bar.n))
        if step_index == self.total - 1:
            self.bar.close()
            self.bar = None


def _report_progress(progress, step_index, num_steps: int, device):
    """Call progress(step_index, num_steps) on the host once per step, from inside jit.

    An io_callback pinned to ONE device: ordered callbacks are refused for computations over several devices, and
    an unpinned callback would fire once per device of a sharded sampler. Device 0 (process 0's first device) is
    the default; pass another if the sampling mesh does not include it."""
    from jax.experimental import io_callback
    from jax.sharding import SingleDeviceSharding

    io_callback(lambda i: progress(int(i), num_steps), None, step_index,
                sharding=SingleDeviceSharding(device if device is not None else jax.devices()[0]), ordered=False)


def sample(denoise_fn: DenoiseFn, x_T, sampler, *, rng=None, progress=None, return_intermediates: bool = False,
           progress_desc: str = "sampling", progress_device=None):
    """Run the whole reverse process x_T -> x_0 as a single ``lax.scan`` over the sampler's steps.

    progress: None; True for a tqdm bar; or a host function ``f(step_index: int, num_steps: int)`` called once
    after each step through an ``io_callback`` on ``progress_device`` (default ``jax.devices()[0]``); it does not
    break jit and works when the loop is sharded over a mesh that holds that device.
    Returns x_0, or with ``return_intermediates`` (x_0, {"samples": (n, ...) x after each step,
    "pred_x0": (n, ...) predicted x0 at each step}).
    """
    timesteps = np.asarray(sampler.timesteps)
    num_steps = int(timesteps.shape[0])
    if sampler.needs_noise and rng is None:
        raise ValueError("sample: this sampler draws noise at every step (eta > 0 or stochastic); pass rng=")
    if progress is True:
        progress = _ProgressBar(num_steps, progress_desc)

    multistep = hasattr(sampler, "init_state")  # DPM-Solver++, UniPC: earlier model outputs ride in the carry

    def body(carry, xs):
        x, state = carry if multistep else (carry, None)
        t, step_index = xs
        model_out = denoise_fn(x, t, step_index)
        if model_out.shape != x.shape:
            raise ValueError(f"sample: denoise_fn returned shape {model_out.shape}, expected the sample's {x.shape}")
        noise = step_noise(rng, step_index, x.shape, x.dtype) if sampler.needs_noise else None
        if multistep:
            x_next, pred_x0, state = sampler.step(model_out, step_index, x, noise, state)
        else:
            x_next, pred_x0 = sampler.step(model_out, step_index, x, noise)
        x_next = x_next.astype(x.dtype)  # the scan carry keeps x_T's dtype whatever the model computes in
        if progress is not None:
            _report_progress(progress, step_index, num_steps, progress_device)
        return ((x_next, state) if multistep else x_next), ((x_next, pred_x0) if return_intermediates else None)

    t_dtype = jnp.int32 if np.issubdtype(timesteps.dtype, np.integer) else jnp.float32
    xs = (jnp.asarray(timesteps, t_dtype), jnp.arange(num_steps, dtype=jnp.int32))
    carry, stacked = jax.lax.scan(body, (x_T, sampler.init_state(x_T)) if multistep else x_T, xs)
    x0 = carry[0] if multistep else carry
    if return_intermediates:
        return x0, {"samples": stacked[0], "pred_x0": stacked[1]}
    return x0
