"""How the benchmark measures: wall time of synchronized calls, peak memory, the device's peak FLOP/s, and what
XLA's cost analysis counts for a loop.

Step time = the median of ``iters`` calls after ``warmup`` calls, each call followed by the implementation's device
synchronization (``jax.block_until_ready`` / ``torch.cuda.synchronize``), so queued asynchronous work is never
mistaken for speed. Compilation happens in the warm-up calls (or before, for jaxvc's ahead-of-time compile) and is
reported separately.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from typing import Any, Callable, ContextManager

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    times_s: list[float]
    warmup_s: float  # the warm-up calls together (torch.compile's compilation happens here)


def time_calls(call: Callable[[], Any], sync: Callable[[Any], None], *, warmup: int, iters: int,
               trace: Callable[[], ContextManager] | None = None, trace_calls: int = 2) -> Timing:
    """Median wall time of ``call()`` + ``sync(result)`` over ``iters`` calls after ``warmup`` calls.

    ``trace``: a profiler context (``--profile``), entered after the timed calls for ``trace_calls`` more calls, so
    that the profiler's own cost never enters the timings.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    start = time.perf_counter()
    for _ in range(warmup):
        sync(call())
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    if trace is not None:
        with trace():
            for _ in range(trace_calls):
                sync(call())
    return Timing(statistics.median(times), min(times), times, warmup_s)


def jax_trace(directory) -> Callable[[], ContextManager]:
    """``time_calls``'s ``trace`` for jaxvc rows: JAX's profiler into ``directory`` (``plugins/profile/<time>/
    <host>.xplane.pb``, for TensorBoard's Profile tab, XProf or Perfetto)."""
    return lambda: jax.profiler.trace(str(directory))


def process_peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def jax_peak_memory(device=None) -> tuple[int | None, str]:
    """(bytes, what): the device allocator's peak where JAX exposes it, else the process peak RSS (CPU)."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator statistics
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak (process so far)"
    return process_peak_rss_bytes(), "process peak RSS"


def measure_peak_flops(device=None, *, size: int | None = None, dtype: str | None = None, iters: int = 10) -> dict:
    """The device's achievable matmul FLOP/s, measured once: an n x n x n matmul, the fastest of ``iters`` runs (a
    peak is a best case; on a shared CPU the median would measure the neighbours).

    GPU/TPU: bf16 at n = 8192 (the dense bf16 rate MFU is quoted against). CPU: float32 at n = 1024, because XLA:CPU
    has no native bf16 matmul (it converts, so a bf16 measurement would understate the machine several times).
    """
    device = device or jax.devices()[0]
    on_cpu = device.platform == "cpu"
    dtype = dtype or ("float32" if on_cpu else "bfloat16")
    size = size or (1024 if on_cpu else 8192)
    keys = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(keys[0], (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(keys[1], (size, size), dtype), device)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    timing = time_calls(lambda: matmul(a, b), jax.block_until_ready, warmup=2, iters=iters)
    return {"flops_per_s": 2.0 * size ** 3 / timing.min_s, "dtype": dtype, "size": size, "min_s": timing.min_s,
            "median_s": timing.median_s}


def xla_counts_loop_body_once() -> bool:
    """Whether XLA's cost analysis counts a ``lax.scan``/while body once rather than once per iteration.

    (jax 0.10 / current XLA: once.) A 10-step scan of one matmul tells, so whole-loop counts (the sampler) can be
    scaled by the step count only when that is what XLA does.
    """
    from jaxvc.train.metrics import compiled_flops

    x = jnp.ones((32, 32), jnp.float32)
    looped = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=10)[0])
    flops = compiled_flops(looped.lower(x).compile()) or 0.0
    one = 2.0 * 32 ** 3
    return bool(np.isclose(flops, one, rtol=0.05))
