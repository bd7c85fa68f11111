"""Lower the benchmark's programs for a platform this host does not have (``python -m jaxvc.bench --lower-for cuda``).

A GPU or TPU lease is short and costly; a program that fails to trace there wastes it. JAX can lower (trace + emit
StableHLO) for any platform from any host: ``jit(f).trace(*args).lower(lowering_platforms=("cuda",))``. All of the
platform-specific decisions made in Python happen then: which attention calls become cuDNN's flash attention, and
whether jax's own cuDNN rules accept their shapes. The H200 run of 2026-12-04 failed exactly there ("Unsupported
sequence length Q 17408, KV 77", at trace time) and that failure reproduces on a CPU with this module. What lowering
cannot show is what only the device's compiler and runtime decide: memory, speed, cuDNN's run-time plan choice.

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
    dot_generals: int = 0           # matmuls/einsums left to XLA (projections, einsum attention)
    convolutions: int = 0

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
    lowering.dot_generals = text.count("stablehlo.dot_general")
    lowering.convolutions = text.count("stablehlo.convolution")
    lowering.stablehlo_ops = sum(1 for line in text.splitlines() if re.search(r"= (stablehlo|chlo|mhlo)\.", line))
    return lowering


def platform_rules(platform: str, cudnn_version: int = 91900, compute_capability: str = "9.0"):
    """The context to build and lower programs for ``platform`` in (``assume_cuda_device`` for cuda). Building
    counts: ``method.abstract_params()`` traces the model, cuDNN attention included."""
    if platform == "cuda":
        return assume_cuda_device(cudnn_version, compute_capability)
    return contextlib.nullcontext()


def lower_workload(name: str, build, platform: str, image_size: int) -> Lowering:
    """Build ``(program, args) = build()`` and lower it, inside ``platform_rules``; a failure is kept as the row's
    error, like a benchmark's."""
    lowering = Lowering(name, image_size, platform)
    start = time.perf_counter()
    try:
        program, args = build()
        inspect(lower(program, args, platform), lowering)
    except Exception as error:  # a backend rule that rejects a shape, an unsupported primitive, ...
        lowering.error = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    lowering.seconds = time.perf_counter() - start
    return lowering


def format_lowerings(rows: list[Lowering]) -> str:
    header = ("workload", "platform", "lowered", "cuDNN attn fwd", "cuDNN attn bwd", "dot_general", "convolution",
              "StableHLO ops", "trace+lower")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (f"{row.workload} @{row.image_size}px", row.platform, "yes" if row.ok else f"no: {row.error}",
                 *(str(v) if row.ok else "-" for v in (row.cudnn_attention, row.cudnn_attention_backward,
                                                        row.dot_generals, row.convolutions, row.stablehlo_ops)),
                 f"{row.seconds:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
