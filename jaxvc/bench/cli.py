"""``python -m jaxvc.bench`` / ``jaxvc bench``: VideoMaker train step, 30-step guided sampling and VAE decode timed
in jaxvc and in the diffusers PyTorch reference in the same run, printed as one side-by-side table.

    python -m jaxvc.bench --size tiny                                   # CPU, minutes on 2 cores
    python -m jaxvc.bench --size sd15 --image-size 256 512 --torch-compile --out results/bench_h100   # a GPU
    python -m jaxvc.bench --size sd15 --lower-for cuda    # any host: does every workload lower for a GPU?

Every number is the median of --iters synchronized calls after --warmup calls. MFU = model FLOPs / step time / the
device's peak FLOP/s, measured once here with a large matmul (bf16 on accelerators, fp32 on CPU where XLA has no
native bf16 matmul). Model FLOPs are the analytic count (jaxvc/bench/flops.py: convs, matmuls, attention incl. the
reference tokens, the backward actually needed), the same for every implementation; the count from the compiled
executable's cost_analysis() is printed beside it as the cross-check (it adds remat recompute and elementwise work;
on GPU it cannot see cuBLAS/cuDNN custom calls, i.e. most of the GEMMs, convolutions and attention). Memory: on GPU
the allocator peak (JAX: process-wide so far; torch: per workload); on CPU the process peak RSS, shared by both
implementations.
Order: for each resolution torch eager, then jaxvc (torch frees its cache first: the allocators share the device);
torch.compile of every resolution last. Each measurement is printed when it is done and, with --out, written at once.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device in the same process
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
WORKLOAD_NAMES = {"train": "train step", "sampling": "sampling", "vae": "VAE decode"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxvc.bench.cross_lower import PLATFORMS
    from jaxvc.bench.gpu_targets import TARGETS
    from jaxvc.bench.sizes import SIZES
    from jaxvc.train.compute import REMAT_POLICIES

    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="model size: tiny (CPU topology, CI-friendly) or sd15 (SD1.5 UNet + AnimateDiff v3 "
                             "motion modules, SD VAE, CLIP ViT-L text encoder)")
    parser.add_argument("--image-size", type=int, nargs="+", default=None,
                        help="pixel side length(s); one table row group each (default: tiny 32, sd15 256 512)")
    parser.add_argument("--frames", type=int, default=None,
                        help="generated frames per video; the reference adds one through the UNet (default: tiny 4, "
                             "sd15 16)")
    parser.add_argument("--batch", type=int, default=None, help="videos per train step / per sampling run (default 1)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="compute dtype of both implementations (parameters stay fp32 for training, norms and "
                             "softmax in fp32); auto: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--attention", choices=["auto", "xla", "jax", "cudnn", "splash"], default="auto",
                        help="jaxvc UNet attention backend: xla (einsum + fp32 softmax), jax "
                             "(jax.nn.dot_product_attention), cudnn (cuDNN flash attention; GPU, bf16/fp16 only), "
                             "splash (Pallas splash flash attention; TPU); auto: cudnn on a GPU with bf16, splash on "
                             "a TPU with bf16, else xla. The VAE and text encoder keep xla")
    parser.add_argument("--remat", choices=["auto", "none", *REMAT_POLICIES], default="auto",
                        help="jaxvc train-step rematerialization of every ResNet/transformer/motion block: full = "
                             "recompute everything inside the block in the backward pass (nothing saved); "
                             "dots_saveable etc. = the jax.checkpoint policy of that name (keeps matmul outputs); "
                             "the PyTorch reference checkpoints every block for any of them. auto: full for sd15, "
                             "none for tiny")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOAD_NAMES), default=sorted(WORKLOAD_NAMES),
                        help="which rows to measure")
    parser.add_argument("--sampling-steps", type=int, default=30, help="DDIM steps of the sampling row")
    parser.add_argument("--guidance", type=float, default=8.0, help="classifier-free guidance scale")
    parser.add_argument("--vae-chunk", type=int, default=None,
                        help="jaxvc VAE decode: frames decoded at once (default: all B*F together)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default: tiny 5, "
                                                                  "sd15 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls; the median is reported (default 5)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference columns")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time torch.compile(UNet / VAE) (a compile failure becomes 'n/a' with the reason)")
    parser.add_argument("--torch-compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                        default="default", help="torch.compile mode")
    parser.add_argument("--torch-device", default="auto", help="torch device (auto: cuda if available, else cpu)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="device peak FLOP/s for MFU instead of measuring it with a matmul")
    parser.add_argument("--xla-fast-compile", action="store_true",
                        help="compile jaxvc with XLA backend optimization level 0 (several times faster XLA:CPU "
                             "compiles, slower code: for smoke tests only, never for reported timings; FLOP "
                             "counts are unaffected)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: once this much has passed, workloads not yet started are skipped (reported "
                             "as such) and the table is printed; for leased or time-limited machines. With --out the "
                             "JSON/CSV are also rewritten after every measurement, so a run stopped from outside "
                             "keeps what it measured")
    parser.add_argument("--lower-for", choices=PLATFORMS, default=None,
                        help="time nothing: lower (trace + emit StableHLO) each jaxvc workload for this platform, "
                             "from any host, with shape-only weights, and print what it would run (cuDNN attention "
                             "calls, dots, convolutions) or why it fails. A check before a GPU/TPU lease: jax's "
                             "cuDNN shape rules run at this stage. Exit status 1 if any workload fails to lower")
    parser.add_argument("--compile-for", default=None, metavar="GPU",
                        help="like --lower-for cuda, and also compile each workload with XLA's GPU compiler for this "
                             f"GPU without one: {', '.join(sorted(TARGETS))}, or a GpuTargetConfigProto text file. "
                             "Prints XLA's "
                             "memory plan of one call (arguments, temporaries, share of device memory). Needs jax's "
                             "CUDA plugin (pip install \"jax[cuda12]\"), no GPU or driver; autotuning is skipped")
    parser.add_argument("--assume-cudnn", default="9.19",
                        help="with --lower-for cuda: the cuDNN version jax's attention rules assume (default 9.19)")
    parser.add_argument("--assume-compute-capability", default="9.0",
                        help="with --lower-for cuda: the GPU's compute capability (9.0: H100/H200; 8.0: A100); "
                             "--compile-for takes it from its GPU")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after each row's timed calls, profile 2 more: jaxvc rows with JAX's profiler into "
                             "DIR/jaxvc_<workload>_<size>px (TensorBoard's Profile tab, XProf, Perfetto), torch rows "
                             "with torch.profiler as Chrome traces DIR/torch_<eager|compile>_<workload>_<size>px.json "
                             "(Perfetto); the timings do not include them")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights and inputs (the same for jaxvc and torch rows)")
    parser.add_argument("--out", default=None,
                        help="write <out>.json (header, every measurement, the table) and <out>.csv")


def resolve(args, platform_name: str) -> argparse.Namespace:
    """Fill the 'auto'/None defaults from the size and the platform."""
    from jaxvc.bench.sizes import SIZES

    spec = SIZES[args.size]
    on_accelerator = platform_name != "cpu"
    args.image_size = args.image_size or list(spec.image_sizes)
    args.frames = args.frames or spec.frames
    args.batch = args.batch or spec.batch
    if args.dtype == "auto":
        args.dtype = "bfloat16" if on_accelerator else "float32"
    if args.attention == "auto":
        flash = {"gpu": "cudnn", "tpu": "splash"}.get(platform_name)
        args.attention = flash if flash and args.dtype == "bfloat16" else "xla"
    if args.remat == "auto":
        args.remat = "full" if args.size == "sd15" else "none"
    if args.warmup is None:
        # XLA:CPU's first calls of a train step run 2-8x slower than the steady state (measured: 882, 362, 177, 349,
        # then a 103 ms median) as its runtime sets itself up: tiny (a CPU size) warms up longer
        args.warmup = 2 if args.size == "sd15" else 5
    if args.iters is None:
        args.iters = 5
    return args


def check_attention(args, platform_name: str) -> None:
    if args.attention == "cudnn" and platform_name != "gpu":
        raise SystemExit("--attention cudnn needs an NVIDIA GPU (cuDNN flash attention); use xla or jax here, or "
                         "--lower-for cuda to check how it lowers")
    if args.attention == "splash" and platform_name != "tpu":
        raise SystemExit("--attention splash needs a TPU (off a TPU the Pallas kernel runs in interpret mode, far too "
                         "slow to time); use xla or jax here, or --lower-for tpu to check how it lowers")
    if args.attention == "cudnn" and args.dtype == "float32":
        raise SystemExit("--attention cudnn needs --dtype bfloat16 (cuDNN flash attention takes bf16/fp16 only)")


def wanted_workloads(args) -> list[str]:
    return [WORKLOAD_NAMES[w] for w in sorted(args.workloads, key=list(WORKLOAD_NAMES).index)]


def run_lowering(args) -> int:
    """--lower-for: every wanted workload at every resolution lowered for that platform (shape-only weights)."""
    import json

    import jax
    import jax.numpy as jnp

    from jaxvc.bench import cross_lower
    from jaxvc.bench.sizes import model_configs

    gpu = None
    if args.compile_for:
        from jaxvc.bench.gpu_targets import resolve_target

        if args.lower_for not in (None, "cuda"):
            raise SystemExit(f"--compile-for compiles for an NVIDIA GPU: --lower-for {args.lower_for} contradicts it")
        try:
            gpu = resolve_target(args.compile_for, cudnn=args.assume_cudnn)
        except ValueError as error:
            raise SystemExit(f"--compile-for: {error}") from None
        args.lower_for, args.assume_compute_capability = "cuda", gpu.compute_capability
    target = args.lower_for
    if target == "rocm" and args.attention == "auto":
        args.attention = "xla"  # cuDNN is NVIDIA's
    args = resolve(args, {"cuda": "gpu", "rocm": "gpu"}.get(target, target))
    kernel_target = {"cudnn": "cuda", "splash": "tpu"}.get(args.attention)  # the flash kernels' one platform
    if kernel_target and target != kernel_target:
        raise SystemExit(f"--attention {args.attention} lowers for {kernel_target} only, not {target}")
    check_attention(args, "tpu" if target == "tpu" else "gpu")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    configs = model_configs(args.size, dtype=dtype, attention_backend=args.attention, remat=args.remat)
    cudnn_version = _cudnn_version_number(args.assume_cudnn)
    device_sharding = None
    if gpu is not None:
        from jaxvc.bench.gpu_targets import device_sharding as make_device_sharding

        try:
            device_sharding = make_device_sharding(gpu)
        except RuntimeError as error:
            raise SystemExit(f"--compile-for {args.compile_for}: {error}") from None
    mode = f"--compile-for {gpu.name}" if gpu else f"--lower-for {target}"
    print(f"jaxvc bench {mode}: size {args.size}, {args.frames}+1 frames, batch {args.batch}, "
          f"{args.dtype}, attention {args.attention}, remat {args.remat}"
          + (f"; assuming cuDNN {args.assume_cudnn} on compute capability {args.assume_compute_capability}"
             if target == "cuda" else ""), flush=True)
    rules = cross_lower.platform_rules(target, cudnn_version, args.assume_compute_capability)
    with rules:
        rows = _lower_all(args, configs, target, device_sharding, gpu.memory_bytes if gpu else None)
    print()
    print(cross_lower.format_lowerings(rows))
    if args.out:
        path = f"{args.out}.json"
        with open(path, "w") as handle:
            json.dump({"lower_for": target, "compile_for": gpu.name if gpu else None,
                       "gpu_target_config": gpu.config_text if gpu else None, "versions": {"jax": jax.__version__},
                       "settings": {k: getattr(args, k) for k in ("size", "image_size", "frames", "batch", "dtype",
                                                                  "attention", "remat", "assume_cudnn",
                                                                  "assume_compute_capability")},
                       "lowerings": [dict(vars(row), ok=row.ok, planned_bytes=row.planned_bytes) for row in rows]},
                      handle, indent=1)
        print(f"wrote {path}")
    return 0 if all(row.ok for row in rows) else 1


def _lower_all(args, configs, target: str, device_sharding, device_memory_bytes) -> list:
    import functools

    from jaxvc.bench import cross_lower, jax_workloads
    from jaxvc.train.state import unbox

    @functools.cache
    def shape_only_params(method):  # traced once, inside a row: a model that fails to trace is that row's error
        return unbox(method.abstract_params())  # ShapeDtypeStructs: nothing allocated

    rows = []
    first = None
    for size in args.image_size:
        method = jax_workloads.build_method(configs, args.frames, size)
        first = first or method  # the weights do not depend on the resolution
        params = lambda: shape_only_params(first)
        builders = {
            "train step": lambda: jax_workloads.train_step_program(method, params(), args.batch),
            "sampling": lambda: jax_workloads.sampling_program(method, params(), args.batch,
                                                               steps=args.sampling_steps, guidance=args.guidance),
            "VAE decode": lambda: jax_workloads.vae_decode_program(method, params(), args.batch,
                                                                   chunk=args.vae_chunk)}
        for workload in wanted_workloads(args):
            if device_sharding is not None:
                print(f"  compiling {workload} @{size}px ...", flush=True)
            row = cross_lower.lower_workload(workload, builders[workload], target, size,
                                             device_sharding=device_sharding, device_memory_bytes=device_memory_bytes)
            done = f"{'compiled' if row.compile_s is not None else 'lowered'} in {row.seconds:.1f} s"
            plan = f", XLA plan {row.planned_bytes / 2 ** 30:.2f} GiB per call" if row.planned_bytes else ""
            print(f"    {workload} @{size}px: " + (f"{done}, {row.cudnn_attention} cuDNN attention calls{plan}"
                                                     if row.ok else row.error), flush=True)
            rows.append(row)
    return rows


def _cudnn_version_number(text: str) -> int:
    """'9.19' or '9.19.0' -> 91900, cuDNN's own integer form (major * 10000 + minor * 100 + patch)."""
    try:
        major, minor, patch = (int(part) for part in (text.split(".") + ["0", "0"])[:3])
    except ValueError:
        raise SystemExit(f"--assume-cudnn {text!r}: expected a version like 9.19") from None
    return major * 10000 + minor * 100 + patch


def versions() -> dict:
    import diffusers
    import flax
    import jax
    import jaxlib

    out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "flax": flax.__version__, "diffusers": diffusers.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    return out


def profile_path(args, implementation: str, workload: str, size: int, suffix: str = "") -> Path:
    """Where ``--profile`` puts a row's trace: DIR/<implementation>_<workload>_<size>px[suffix]."""
    name = f"{implementation.replace('.', '_').replace(' ', '_')}_{workload.replace(' ', '_')}_{size}px".lower()
    return Path(args.profile) / (name + suffix)


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from jaxvc import compile_options
    from jaxvc.bench import flops as analytic
    from jaxvc.bench import jax_workloads
    from jaxvc.bench.report import Measurement, finish, format_table, table_rows, write_outputs
    from jaxvc.bench.sizes import model_configs
    from jaxvc.bench.timing import jax_trace, measure_peak_flops, xla_counts_loop_body_once

    if args.lower_for or args.compile_for:
        return run_lowering(args)
    started = time.perf_counter()
    device = jax.devices()[0]
    args = resolve(args, device.platform)
    check_attention(args, device.platform)
    wanted = wanted_workloads(args)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    configs = model_configs(args.size, dtype=dtype, attention_backend=args.attention, remat=args.remat)

    # jaxvc's compiles get the library's per-backend defaults, as a user's would (jaxvc/compile_options.py)
    xla_options = compile_options.merged(FAST_COMPILE if args.xla_fast_compile else None, platform=device.platform)
    peak = ({"flops_per_s": args.peak_flops, "dtype": "given", "size": None} if args.peak_flops
            else measure_peak_flops(device))
    header = {"device": f"{device.platform}: {device.device_kind} (x{jax.device_count()})",
              "host": f"{platform.node()} {os.cpu_count()} CPUs", "versions": versions(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_compile_options": xla_options or {},
              "peak_flops_per_s": peak["flops_per_s"],
              "peak_flops_how": (f"measured: {peak['size']}^3 {peak['dtype']} matmul" if peak["size"]
                                 else "given with --peak-flops"),
              "settings": {k: getattr(args, k) for k in ("size", "image_size", "frames", "batch", "dtype",
                                                         "attention", "remat", "sampling_steps", "guidance",
                                                         "warmup", "iters", "vae_chunk", "torch_compile",
                                                         "torch_compile_mode", "torch_threads",
                                                         "xla_fast_compile", "time_budget", "profile")}}
    print(f"jaxvc bench: {header['device']}; {header['host']}; " +
          ", ".join(f"{k} {v}" for k, v in header["versions"].items()) +
          (f"; XLA_FLAGS={header['xla_flags']}" if header["xla_flags"] else "") +
          (f"; jaxvc compile options {xla_options}" if xla_options else ""), flush=True)
    print(f"  peak {peak['flops_per_s'] / 1e12:.3g} TFLOP/s ({header['peak_flops_how']}); size {args.size}, "
          f"{args.frames}+1 frames, batch {args.batch}, {args.dtype}, attention {args.attention}, remat "
          f"{args.remat}, {args.sampling_steps} DDIM steps, warmup {args.warmup}, iters {args.iters}", flush=True)

    latent_of = lambda image_size: image_size // configs.vae.downsample_factor
    trainable = jax_workloads._trainable_path(jax_workloads.build_method(configs, args.frames, args.image_size[0]))
    analytic_counts = {}
    for size in args.image_size:
        latent = latent_of(size)
        analytic_counts[(size, "train step")] = analytic.train_step_flops(
            configs.unet, configs.text, args.batch, args.frames, latent, trainable)["total"]
        analytic_counts[(size, "sampling")] = analytic.sampling_flops(configs.unet, args.batch, args.frames, latent,
                                                                      args.sampling_steps)
        analytic_counts[(size, "VAE decode")] = analytic.vae_decode_flops(configs.vae, args.batch * args.frames,
                                                                          latent)

    measurements: list[Measurement] = []

    def record(m: Measurement) -> None:
        """Keep a measurement, print it at once and rewrite the outputs, so a run stopped from outside (a lease
        running out, a timeout) keeps everything measured so far."""
        finish(m, peak["flops_per_s"])
        measurements.append(m)
        if m.error:
            print(f"    {m.implementation} {m.workload} @{m.image_size}px: {m.error}", flush=True)
        else:
            print(f"    {m.implementation} {m.workload} @{m.image_size}px: {m.step_s * 1e3:.1f} ms"
                  + (f", MFU {100 * m.mfu:.1f}%" if m.mfu is not None else "")
                  + (f", compile {m.compile_s:.0f} s" if m.compile_s else ""), flush=True)
        if args.out:
            write_outputs(args.out, header, measurements, table_rows(measurements))

    def out_of_time() -> bool:
        return args.time_budget is not None and time.perf_counter() - started > args.time_budget

    def skipped(workload, implementation, size) -> Measurement:
        return Measurement(workload, implementation, size, args.batch, analytic_flops=analytic_counts[(size, workload)],
                           error=f"skipped: past --time-budget {args.time_budget:g} s")

    torch_side = None if args.no_torch else TorchSide.create(args, configs, latent_of, analytic_counts)
    loop_once = xla_counts_loop_body_once()
    params = None
    # Per resolution: torch eager, then jaxvc; torch.compile (the longest compiles) last, so a time budget or an
    # outside timeout cuts it first.
    for size in args.image_size:
        if torch_side is not None:
            torch_side.measure(size, wanted, compile=False, record=record, out_of_time=out_of_time,
                               skipped=skipped)
        method = jax_workloads.build_method(configs, args.frames, size)
        if params is None:
            # the same weights serve every resolution
            params = jax_workloads.init_params(method, args.seed)
        common = dict(warmup=args.warmup, iters=args.iters, compiler_options=xla_options)
        # smallest footprint first: JAX's allocator peak cannot be reset, so each row's peak is "so far"
        for workload in sorted(wanted, key=["VAE decode", "sampling", "train step"].index):
            if out_of_time():
                record(skipped(workload, "jaxvc", size))
                continue
            print(f"  jaxvc {workload} @{size}px ...", flush=True)
            trace = jax_trace(profile_path(args, "jaxvc", workload, size)) if args.profile else None
            try:
                if workload == "VAE decode":
                    m = jax_workloads.vae_decode(method, params, args.batch, chunk=args.vae_chunk, trace=trace,
                                                 **common)
                elif workload == "sampling":
                    m = jax_workloads.sampling(method, params, args.batch, steps=args.sampling_steps,
                                               guidance=args.guidance, loop_counted_once=loop_once, trace=trace,
                                               **common)
                else:
                    m = jax_workloads.train_step(method, params, args.batch, trace=trace, **common)
            except Exception as error:  # out of memory, an attention backend that rejects a shape, ...
                message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
                m = Measurement(workload, "jaxvc", size, args.batch, error=message,
                                analytic_flops=analytic_counts[(size, workload)])
            record(m)
    if torch_side is not None and args.torch_compile:
        for size in args.image_size:
            torch_side.measure(size, wanted, compile=True, record=record, out_of_time=out_of_time, skipped=skipped)

    rows = table_rows(measurements)
    print()
    print(format_table(rows))
    memory_kinds = sorted({f"{m.implementation}: {m.memory_kind}" for m in measurements if m.memory_kind})
    print(f"\nmemory columns: {'; '.join(memory_kinds)}. Ratios = torch time / jaxvc time (>1: jaxvc faster). "
          f"MFU = the analytic model FLOPs (no remat recompute) / time / peak, for every implementation; "
          f"'GFLOP xla' is XLA's cost analysis of what it compiled (remat recompute in; on GPU every cuBLAS/cuDNN "
          f"custom call - GEMMs, convolutions, attention - out, so it is far below the model FLOPs there).")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        paths = write_outputs(args.out, header, measurements, rows)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


class TorchSide:
    """The PyTorch reference: models built once, measured per resolution, eager or compiled; frees the device's
    cache after each pass so the JAX allocator that runs next has the memory."""

    def __init__(self, args, models, device: str, torch_dtype: str, latent_of, analytic_counts, compile_problem):
        self.args, self.models, self.device, self.torch_dtype = args, models, device, torch_dtype
        self.latent_of, self.analytic_counts, self.compile_problem = latent_of, analytic_counts, compile_problem

    @classmethod
    def create(cls, args, configs, latent_of, analytic_counts):
        try:
            import torch
        except ImportError:
            print("  torch is not installed: the PyTorch columns are skipped", flush=True)
            return None
        from jaxvc.bench import torch_workloads as tw

        device = args.torch_device if args.torch_device != "auto" else ("cuda" if torch.cuda.is_available()
                                                                         else "cpu")
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # the fastest conv algorithms, as a tuned torch user would run
        torch_dtype = args.dtype if device != "cpu" else "float32"
        if torch_dtype != args.dtype:
            print("  torch on CPU runs float32 (bf16 CPU kernels are not representative)", flush=True)
        compile_problem = tw.describe_compile_support(device) if args.torch_compile else None
        if args.torch_compile and compile_problem is None:
            try:
                tw.timed_compile_probe()
            except Exception as error:
                compile_problem = (f"torch.compile probe failed: {type(error).__name__}: "
                                   f"{str(error).splitlines()[0][:160]}")
        if compile_problem:
            print(f"  torch.compile unavailable here: {compile_problem}", flush=True)
        models = tw.TorchModels(configs, device, seed=args.seed)
        return cls(args, models, device, torch_dtype, latent_of, analytic_counts, compile_problem)

    def measure(self, size: int, wanted, *, compile: bool, record, out_of_time, skipped) -> None:
        import torch

        from jaxvc.bench import torch_workloads as tw
        from jaxvc.bench.report import Measurement

        args, implementation = self.args, "torch.compile" if compile else "torch eager"
        latent = self.latent_of(size)
        for workload in wanted:
            if compile and self.compile_problem:
                record(Measurement(workload, implementation, size, args.batch, error=self.compile_problem))
                continue
            if out_of_time():
                record(skipped(workload, implementation, size))
                continue
            print(f"  {implementation} {workload} @{size}px ...", flush=True)
            common = dict(batch=args.batch, frames=args.frames, latent=latent, image_size=size,
                          dtype=self.torch_dtype, compile=compile, compile_mode=args.torch_compile_mode,
                          warmup=args.warmup, iters=args.iters, analytic_flops=self.analytic_counts[(size, workload)],
                          trace=tw.chrome_trace(profile_path(args, implementation, workload, size, ".json"),
                                                torch.device(self.device)) if args.profile else None)
            if workload == "train step":
                m = tw.train_step(self.models, gradient_checkpointing=args.remat != "none", **common)
            elif workload == "sampling":
                m = tw.sampling(self.models, steps=args.sampling_steps, guidance=args.guidance, **common)
            else:
                m = tw.vae_decode(self.models, **common)
            record(m)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxvc.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
