"""Lower (``--lower-for cuda``) or compile (``--compile-for h200``) the benchmark's programs for a platform this host
does not have.

A GPU or TPU lease is short and costly; a program that fails to trace there wastes it. JAX can lower (trace + emit
StableHLO) for any platform from any host: ``jit(f).trace(*args).lower(lowering_platforms=("cuda",))``. All of the
platform-specific decisions made in Python happen then: which attention calls become cuDNN's flash attention, and
whether jax's own cuDNN rules accept their shapes. The H200 run of 2026-12-04 failed exactly there ("Unsupported
sequence length Q 17408, KV 77", at trace time) and that failure reproduces on a CPU with this module. Lowering
cannot show what the device's compiler decides: memory. With jax's CUDA plugin installed (no GPU needed), the
programs also compile for a described GPU (jaxvc/bench/gpu_targets.py), which gives XLA's memory plan of one call.
Neither can show what only the device's runtime decides: speed, cuDNN's run-time plan choice.

The parameters are ShapeDtypeStructs (``method.abstract_params()``): nothing is allocated, so the SD1.5 sizes lower
on a laptop.

jax asks the installed CUDA plugin for the cuDNN version and the GPU's compute capability while tracing a cuDNN
attention; a CPU host has neither, so ``assume_cuda_device`` answers those questions for the duration (default: an
H100/H200, compute capability 9.0, with the cuDNN 9.19 of the lease).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time

import jax

PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
# jaxlib 0.10's GPU compiler, without a device to autotune on, can fail to tile a Triton GEMM ("Couldn't find output
# tile sizes that satisfy hlo: ... dot(...)"; 0.11 does not); such a program is compiled again with Triton GEMMs off
# (cuBLAS for every dot), and the row records it, since its plan can then differ a little from the device's.
DEVICELESS_FALLBACK = ("Couldn't find output tile sizes", {"xla_gpu_enable_triton_gemm": False})
CUDNN_ATTENTION = re.compile(r"custom_call @__cudnn\$fmha(\w*)")


@contextlib.contextmanager
def assume_cuda_device(cudnn_version: int = 91900, compute_capability: str = "9.0"):
    """Within: jax's cuDNN attention rules see this cuDNN version (9.19 -> 91900) and GPU compute capability."""
    from jax._src.cudnn import fused_attention_stablehlo as rules

    names = ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal")
    missing = [name for name in names if not hasattr(rules, name)]
    if missing:
        raise RuntimeError(f"jax {jax.__version__} has no {', '.join(missing)} in {rules.__name__}: its cuDNN "
                           f"attention rules moved, so lowering for cuda cannot stand in for the GPU here")
    device = _capability(compute_capability)
    saved = {name: getattr(rules, name) for name in names}
    rules.check_cudnn_version = lambda: cudnn_version
    rules.check_compute_capability = lambda capability: device >= _capability(capability)
    rules.is_cuda_compute_capability_equal = lambda capability: device == _capability(capability)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(rules, name, function)


def _capability(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@dataclasses.dataclass
class Lowering:
    """What lowering one program for one platform showed."""
    workload: str
    image_size: int
    platform: str
    seconds: float = 0.0
    error: str | None = None
    stablehlo_ops: int = 0          # operations in the StableHLO module (all functions)
    cudnn_attention: int = 0        # cuDNN flash-attention forward calls (__cudnn$fmhaSoftmax...)
    cudnn_attention_backward: int = 0
    tpu_kernels: int = 0            # Pallas/Mosaic kernel call sites (splash attention; one per distinct shape)
    dot_generals: int = 0           # matmuls/einsums left to XLA (projections, einsum attention)
    convolutions: int = 0
    # compiled for a GPU target (lower_workload with device_sharding): compile time and XLA's plan of one call
    compile_s: float | None = None
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None   # outputs that reuse donated arguments (the train state)
    device_memory_bytes: int | None = None
    compile_options: dict | None = None  # what the compile needed beyond the defaults (DEVICELESS_FALLBACK)

    @property
    def planned_bytes(self) -> int | None:
        """What one call needs on the device: arguments + outputs + temporaries - what outputs share with donated
        arguments (the same sum as the benchmark's "XLA plan per call")."""
        if self.argument_bytes is None:
            return None
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def ok(self) -> bool:
        return self.error is None


def lower(program, args, platform: str) -> str:
    """The StableHLO text of ``program(*args)`` lowered for ``platform``."""
    return program.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def inspect(text: str, lowering: Lowering) -> Lowering:
    """Count what the platform will run: cuDNN attention calls (forward/backward), dots and convolutions."""
    kinds = CUDNN_ATTENTION.findall(text)
    lowering.cudnn_attention = sum(1 for kind in kinds if not kind.endswith("Backward"))
    lowering.cudnn_attention_backward = sum(1 for kind in kinds if kind.endswith("Backward"))
    lowering.tpu_kernels = text.count("@tpu_custom_call")
    lowering.dot_generals = text.count("stablehlo.dot_general")
    lowering.convolutions = text.count("stablehlo.convolution")
    lowering.stablehlo_ops = sum(1 for line in text.splitlines() if re.search(r"= (stablehlo|chlo|mhlo)\.", line))
    return lowering


def platform_rules(platform: str, cudnn_version: int = 91900, compute_capability: str = "9.0"):
    """The context to build and lower programs for ``platform`` in (``assume_cuda_device`` for cuda). Building
    counts: ``method.abstract_params()`` traces the model, cuDNN attention included."""
    if platform == "cuda":
        return assume_cuda_device(cudnn_version, compute_capability)
    if platform == "tpu":
        from jaxvc.models.tpu_attention import assume_platform

        return assume_platform("tpu")  # the splash backend emits its Mosaic kernel, not interpret mode
    return contextlib.nullcontext()


def lower_workload(name: str, build, platform: str, image_size: int, *, device_sharding=None,
                   device_memory_bytes: int | None = None) -> Lowering:
    """Build ``(program, args) = build()`` and lower it, inside ``platform_rules``; a failure is kept as the row's
    error, like a benchmark's. With ``device_sharding`` (a device of a device-less GPU topology,
    jaxvc/bench/gpu_targets.py) the arguments are placed on that device and the program is also compiled for it,
    which records XLA's compile time and memory plan."""
    lowering = Lowering(name, image_size, platform, device_memory_bytes=device_memory_bytes)
    start = time.perf_counter()
    try:
        program, args = build()
        if device_sharding is None:
            inspect(lower(program, args, platform), lowering)
        else:
            args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device_sharding), args)
            lowered = program.trace(*args).lower()  # the platform comes from the arguments' device
            inspect(lowered.as_text(), lowering)
            compile_start = time.perf_counter()
            compiled, lowering.compile_options = compile_with_fallback(lowered.compile)
            memory = compiled.memory_analysis()
            lowering.compile_s = time.perf_counter() - compile_start
            lowering.argument_bytes, lowering.output_bytes = memory.argument_size_in_bytes, memory.output_size_in_bytes
            lowering.temp_bytes, lowering.alias_bytes = memory.temp_size_in_bytes, memory.alias_size_in_bytes
    except Exception as error:  # a backend rule that rejects a shape, an unsupported primitive, ...
        lowering.error = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    lowering.seconds = time.perf_counter() - start
    return lowering


def compile_with_fallback(compile, options: dict | None = None):
    """(``compile(options)``, None), or, when XLA's device-less GPU compile fails the way DEVICELESS_FALLBACK names,
    (``compile(options + the fallback)``, the fallback options): the one retry rule of ``--compile-for`` and of
    ``jaxvc plan`` on GPU clusters."""
    try:
        return compile(options), None
    except Exception as error:
        if DEVICELESS_FALLBACK[0] not in str(error):
            raise
    return compile({**(options or {}), **DEVICELESS_FALLBACK[1]}), DEVICELESS_FALLBACK[1]


def format_lowerings(rows: list[Lowering]) -> str:
    compiled = any(row.compile_s is not None for row in rows)
    header = ["workload", "platform", "lowered", "cuDNN attn fwd", "cuDNN attn bwd", "TPU kernels", "dot_general",
              "convolution", "StableHLO ops", "trace+lower"]
    if compiled:
        header[-1] = "trace+lower+compile"
        header += ["XLA plan per call", "arguments", "temporaries", "of device memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row.workload} @{row.image_size}px", row.platform, _outcome(row),
                 *(str(v) if row.ok else "-" for v in (row.cudnn_attention, row.cudnn_attention_backward,
                                                        row.tpu_kernels, row.dot_generals, row.convolutions, row.stablehlo_ops)),
                 f"{row.seconds:.1f} s"]
        if compiled:
            planned = row.planned_bytes
            cells += ["-"] * 4 if planned is None else [
                _gib(planned), _gib(row.argument_bytes), _gib(row.temp_bytes),
                f"{100 * planned / row.device_memory_bytes:.1f}%" if row.device_memory_bytes else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _outcome(row: Lowering) -> str:
    if not row.ok:
        return f"no: {row.error}"
    if row.compile_options:
        return "yes, with " + ", ".join(f"{key}={value}" for key, value in row.compile_options.items())
    return "yes"


def _gib(count: int) -> str:
    return f"{count / 2 ** 30:.2f} GiB"
