"""The PyTorch reference for the same work: what a user would run with diffusers instead of jaxvc.

Same architecture (``sizes.diffusers_unet_kwargs``: ``UNetMotionModel`` = SD UNet + AnimateDiff motion modules,
``AutoencoderKL``, transformers ``CLIPTextModel``), same shapes and batch, random weights. VideoMaker's reference
injection comes from ``jaxvc/bench/torch_pisa.py`` (PISA processors on every spatial attn1, SDPA attention).

* train step: frozen CLIP text encoder (no grad) -> GIRL noising of video and reference latents -> UNet on F+1
  frames -> video MSE + 0.1 reference MSE -> backward -> global-norm clip 1.0 -> AdamW (lr 1e-5, wd 1e-2) over the
  same trainable subset (spatial attn1 + motion modules). fp32 master weights; on GPU the forward runs under
  ``torch.autocast(bfloat16)`` (jaxvc: fp32 parameters, bf16 compute). With jaxvc's ``--remat full`` the UNet
  uses diffusers' gradient checkpointing, so both sides trade the same recompute for memory.
* sampling: ``DDIMScheduler`` (linspace, steps_offset 1, no clipping), 30 steps, classifier-free guidance with the
  zero-reference unconditional branch in one doubled batch, reference prediction dropped before each step.
* VAE decode: ``AutoencoderKL.decode`` of the B*F latents.

Inference runs the modules cast to the compute dtype under ``torch.inference_mode``. ``compile=True`` wraps the
UNet (and the VAE) in ``torch.compile``; a failure to compile is reported, not raised.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jaxvc.bench.report import Measurement
from jaxvc.bench.sizes import ModelConfigs, diffusers_unet_kwargs, diffusers_vae_kwargs, transformers_clip_kwargs
from jaxvc.bench.timing import process_peak_rss_bytes, time_calls
from jaxvc.bench.torch_pisa import install_reference_injection

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchModels:
    """diffusers/transformers modules of the same architecture, built directly on ``device``."""

    def __init__(self, configs: ModelConfigs, device: str, seed: int = 0):
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()  # casting random modules with .to(dtype) is intended here
        torch.manual_seed(seed)
        self.device = torch.device(device)
        with self.device:  # parameters are created on the device (fast init for SD sizes on a GPU)
            self.unet = diffusers.UNetMotionModel(**diffusers_unet_kwargs(configs.unet))
            self.text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**transformers_clip_kwargs(
                configs.text)))
            self.vae = diffusers.AutoencoderKL(**diffusers_vae_kwargs(configs.vae))
        self.text.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.scaling_factor = configs.vae.scaling_factor
        self.vocab_size = configs.text.vocab_size
        self.context_dim = configs.text.hidden_size

    def trainable_parameters(self):
        """VideoMaker's subset: every spatial attn1 (not the motion modules') and every motion module weight."""
        chosen = []
        for name, parameter in self.unet.named_parameters():
            motion = "motion_modules" in name
            spatial_attn1 = not motion and ".attn1." in name and ".attentions." in name
            parameter.requires_grad_(motion or spatial_attn1)
            if motion or spatial_attn1:
                chosen.append(parameter)
        return chosen


def synchronize(device: torch.device):
    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return sync


def chrome_trace(path, device: torch.device):
    """``time_calls``'s ``trace`` for torch rows: ``torch.profiler`` (CPU ops; CUDA kernels on a GPU) written as a
    Chrome trace to ``path`` (Perfetto and chrome://tracing open it)."""
    @contextlib.contextmanager
    def context():
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            yield
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
    return context


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated (this workload)"
    return process_peak_rss_bytes(), "process peak RSS"


def _maybe_compile(module, compile: bool, mode: str):
    if not compile:
        return module
    # A fresh dynamo cache per workload: a second resolution would otherwise recompile with dynamic shapes
    # (automatic_dynamic_shapes), which is not what a user compiling for one resolution gets.
    torch._dynamo.reset()
    return torch.compile(module, mode=None if mode == "default" else mode)


def _failure(workload, implementation, image_size, batch, error: Exception) -> Measurement:
    message = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}"
    return Measurement(workload, implementation, image_size, batch, error=message)


def _run(workload, implementation, image_size, batch, device, call, *, warmup, iters, analytic_flops, extra=None,
         trace=None):
    _reset_memory(device)
    try:
        timing = time_calls(call, synchronize(device), warmup=warmup, iters=iters, trace=trace)
    except Exception as error:  # torch.compile without a working inductor toolchain, OOM, ...
        return _failure(workload, implementation, image_size, batch, error)
    memory, kind = _peak_memory(device)
    return Measurement(workload, implementation, image_size, batch, timing.median_s, timing.min_s,
                       peak_memory_bytes=memory, memory_kind=kind, analytic_flops=analytic_flops,
                       compile_s=timing.warmup_s if implementation == "torch.compile" else None,
                       extra={"times_s": timing.times_s, **(extra or {})})


def train_step(models: TorchModels, *, batch: int, frames: int, latent: int, image_size: int, dtype: str,
               compile: bool, compile_mode: str, warmup: int, iters: int, analytic_flops: float,
               gradient_checkpointing: bool = False, trace=None) -> Measurement:
    from diffusers import DDPMScheduler

    device, implementation = models.device, "torch.compile" if compile else "torch eager"
    unet = models.unet.to(torch.float32).train()
    install_reference_injection(unet, frames + 1)
    if gradient_checkpointing:  # the counterpart of jaxvc's --remat full (diffusers checkpoints every block)
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    parameters = models.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = _maybe_compile(unet, compile, compile_mode)
    autocast = torch.autocast(device.type, dtype=TORCH_DTYPES[dtype], enabled=dtype != "float32")
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, frames, latent, latent, device=device, generator=generator)  # (B, C, F, h, w)
    reference = torch.randn(batch, 4, 1, latent, latent, device=device, generator=generator)
    tokens = torch.randint(0, models.vocab_size, (batch, 77), device=device, generator=generator)

    def step():
        with torch.no_grad(), autocast:
            text = models.text(tokens).last_hidden_state                        # (B, 77, D), frozen
        t = torch.randint(0, 1000, (batch,), device=device)
        noise, reference_noise = torch.randn_like(latents), torch.randn_like(reference)
        noisy = scheduler.add_noise(latents, noise, t)
        t_reference = torch.floor(0.01 * t).long()                            # GIRL's remind timestep
        reference_in = scheduler.add_noise(reference, reference_noise, t_reference)
        sample = torch.cat([noisy, reference_in], dim=2)                       # (B, C, F+1, h, w)
        with autocast:
            prediction = model(sample, t, text.repeat_interleave(frames + 1, dim=0)).sample
        prediction = prediction.float()
        loss = F.mse_loss(prediction[:, :, :frames], noise) + 0.1 * F.mse_loss(prediction[:, :, frames:],
                                                                                reference_noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    result = _run("train step", implementation, image_size, batch, device, step, warmup=warmup, iters=iters,
                  analytic_flops=analytic_flops, trace=trace)
    del optimizer
    for parameter in models.unet.parameters():
        parameter.grad = None
    return result


def sampling(models: TorchModels, *, batch: int, frames: int, latent: int, image_size: int, dtype: str,
             compile: bool, compile_mode: str, steps: int, guidance: float, warmup: int, iters: int,
             analytic_flops: float, trace=None) -> Measurement:
    from diffusers import DDIMScheduler

    device, implementation = models.device, "torch.compile" if compile else "torch eager"
    torch_dtype = TORCH_DTYPES[dtype]
    unet = models.unet.to(torch_dtype).eval()
    unet.disable_gradient_checkpointing()
    install_reference_injection(unet, frames + 1)
    model = _maybe_compile(unet, compile, compile_mode)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False, timestep_spacing="linspace")
    generator = torch.Generator(device).manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=generator, dtype=torch_dtype)
    x_T = randn(batch, 4, frames, latent, latent)
    reference = randn(batch, 4, 1, latent, latent)
    text_pair = torch.cat([randn(batch, 77, models.context_dim), randn(batch, 77, models.context_dim)])  # [neg; cond]
    text_pair = text_pair.repeat_interleave(frames + 1, dim=0)               # diffusers wants (2B*(F+1), 77, D)
    reference_pair = torch.cat([torch.zeros_like(reference), reference])     # uncond: zero reference

    @torch.inference_mode()
    def generate():
        scheduler.set_timesteps(steps, device=device)
        latents = x_T
        for t in scheduler.timesteps:
            doubled = torch.cat([latents, latents])                          # [uncond; cond]
            out = model(torch.cat([doubled, reference_pair], dim=2), t, text_pair).sample[:, :, :frames]
            uncond, cond = out.chunk(2)
            # the scheduler's float32 alphas promote the sample; the next UNet call wants the model's dtype
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample.to(torch_dtype)
        return latents

    return _run("sampling", implementation, image_size, batch, device, generate, warmup=warmup, iters=iters,
                analytic_flops=analytic_flops, extra={"steps": steps, "guidance": guidance}, trace=trace)


def vae_decode(models: TorchModels, *, batch: int, frames: int, latent: int, image_size: int, dtype: str,
               compile: bool, compile_mode: str, warmup: int, iters: int, analytic_flops: float,
               trace=None) -> Measurement:
    device, implementation = models.device, "torch.compile" if compile else "torch eager"
    torch_dtype = TORCH_DTYPES[dtype]
    vae = models.vae.to(torch_dtype).eval()
    decode = _maybe_compile(vae.decode, compile, compile_mode)
    latents = torch.randn(batch * frames, 4, latent, latent, device=device, dtype=torch_dtype)

    @torch.inference_mode()
    def call():
        return decode(latents / models.scaling_factor).sample

    return _run("VAE decode", implementation, image_size, batch, device, call, warmup=warmup, iters=iters,
                analytic_flops=analytic_flops, trace=trace)


def describe_compile_support(device: str) -> str | None:
    """None when torch.compile's inductor can be expected to work here, else why not (checked cheaply)."""
    if device == "cpu":
        import shutil

        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "inductor needs a C++ compiler on CPU and none is on PATH"
    try:
        import torch._inductor  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the torch build
        return f"torch._inductor unavailable: {error}"
    return None


def timed_compile_probe() -> float:
    """Seconds to compile and run a 2-op function with inductor (a quick check before compiling a UNet)."""
    start = time.perf_counter()
    fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2)
    fn(torch.randn(8))
    return time.perf_counter() - start
