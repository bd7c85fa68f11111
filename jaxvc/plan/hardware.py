"""TPU generations and abstract pod slices: what one chip offers, and the devices of a slice without the hardware.

``slice_devices("v5p:4x4x4")`` asks libtpu (the ``libtpu`` package; no TPU needed) for the abstract devices of a
slice; a mesh over them lets ``jax.jit(...).lower(...).compile()`` run the real TPU compiler on a CPU machine.

Topology names that libtpu 0.0.42.1 (the pinned one) and 0.0.52 accept (checked): ``v4:AxBxC``, ``v5p:AxBxC``,
``v5e:AxB``, ``v6e:AxB`` (chips per dimension). ``v5litepod`` is not accepted by libtpu; it is read here as ``v5e``.
v4 slices come back with one device per TensorCore (two per chip); v5e/v5p/v6e with one device per chip. Per-device
figures below divide the chip's.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One chip of a TPU generation (all figures per chip)."""
    generation: str
    hbm_bytes: int          # HBM capacity
    peak_bf16_flops: float  # dense bf16 matmul peak, FLOP/s
    hbm_bandwidth: float    # bytes/s
    ici_bandwidth: float    # bytes/s, all of the chip's inter-chip links together (bidirectional)


# Sources (Google Cloud TPU documentation, "System architecture" pages, checked 2026-11):
#   v4  https://cloud.google.com/tpu/docs/v4   : 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s;
#       ICI 2400 Gbps per chip (the v5p page's comparison: v5p doubles v4's 2400 Gbps to 4800 Gbps).
#   v5e https://cloud.google.com/tpu/docs/v5e  : 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 1600 Gbps.
#   v5p https://cloud.google.com/tpu/docs/v5p  : 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 4800 Gbps.
#   v6e https://cloud.google.com/tpu/docs/v6e  : 918 TFLOP/s bf16, 32 GiB HBM at 1640 GB/s, ICI 3584 Gbps.
# (Gbps / 8 = GB/s.) These are marketing peaks: real all-reduces reach a fraction of the ICI figure.
CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GiB, 275e12, 1200e9, 2400e9 / 8),
    "v5e": ChipSpec("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v5p": ChipSpec("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v6e": ChipSpec("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v4p": "v4"}


class TopologyError(ValueError):
    """A topology name libtpu or this table does not know."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A pod slice: its name, the chip, the abstract devices, and how many devices share one chip."""
    topology: str
    chip: ChipSpec
    devices: tuple
    num_chips: int

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.num_chips

    @property
    def device_hbm_bytes(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip

    @property
    def device_peak_flops(self) -> float:
        return self.chip.peak_bf16_flops / self.devices_per_chip

    @property
    def device_hbm_bandwidth(self) -> float:
        return self.chip.hbm_bandwidth / self.devices_per_chip

    @property
    def device_ici_bandwidth(self) -> float:
        return self.chip.ici_bandwidth / self.devices_per_chip


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5p:4x4x4"`` -> ``("v5p", (4, 4, 4))``; also accepts ``v5litepod:2x4`` (read as v5e)."""
    match = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(\d+(?:x\d+){1,2})\s*", name or "")
    if not match:
        raise TopologyError(f"topology '{name}': expected GENERATION:AxB[xC] such as v5p:4x4x4 or v6e:4x4 "
                            f"(generations: {', '.join(CHIPS)})")
    generation = ALIASES.get(match.group(1), match.group(1))
    if generation not in CHIPS:
        raise TopologyError(f"topology '{name}': unknown TPU generation '{match.group(1)}' "
                            f"(known: {', '.join(CHIPS)}; aliases: {', '.join(ALIASES)})")
    dims = tuple(int(d) for d in match.group(2).split("x"))
    want = 3 if generation in ("v4", "v5p") else 2
    if len(dims) != want:
        raise TopologyError(f"topology '{name}': {generation} slices have {want} dimensions "
                            f"(e.g. {generation}:{'x'.join(['2'] * want)})")
    if any(d < 1 for d in dims):
        raise TopologyError(f"topology '{name}': every dimension must be >= 1")
    return generation, dims


def find_libtpu() -> str | None:
    """Path of libtpu.so: $TPU_LIBRARY_PATH, a pip-installed ``libtpu``, or ``<venv>/opt/libtpu`` (where
    ``launch/setup_env.sh --test`` puts it, outside site-packages: an importable libtpu makes every JAX process on a
    machine without TPUs try to start the TPU runtime and print errors)."""
    from_env = os.environ.get("TPU_LIBRARY_PATH")
    if from_env and os.path.isfile(from_env):
        return from_env
    spec = importlib.util.find_spec("libtpu")
    candidates = [Path(p) / "libtpu.so" for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(Path(sys.prefix) / "opt" / "libtpu" / "libtpu" / "libtpu.so")
    return next((str(p) for p in candidates if p.is_file()), None)


# `jaxvc plan --memory-only`: libtpu told that each chip has 1 MiB of HBM. Every program then overflows it, and the
# TPU compiler stops after planning its buffers, before code generation (the half hour of an SD1.5 compile here),
# with "the total memory required for HLO temporaries (X) exceeds available HBM (1.00M)".
MEMORY_ONLY_FLAG = "--xla_tpu_max_hbm_size_mib=1"
MEMORY_ONLY_HBM_BYTES = 1 << 20
_started_memory_only: list[bool] = []  # libtpu reads its flags once per process: with the cap or without


def use_libtpu(memory_only: bool = False) -> str:
    """Point JAX's TPU plugin at libtpu for this process (works after JAX started: the topology client loads the
    plugin on first use), with the memory-only cap if asked. Raises TopologyError naming how to install it, or when
    this process already started libtpu the other way."""
    path = find_libtpu()
    if path is None:
        raise TopologyError("libtpu is not installed: `bash launch/setup_env.sh --test` (puts it in .venv/opt/libtpu), "
                            "`pip install -r launch/requirements-libtpu.txt`, or set TPU_LIBRARY_PATH to a libtpu.so")
    if _started_memory_only and _started_memory_only[0] != memory_only:
        started = "with" if _started_memory_only[0] else "without"
        raise TopologyError(f"libtpu was started in this process {started} the memory-only HBM cap, and reads its "
                            f"flags once: plan {'with' if memory_only else 'without'} --memory-only in a new process")
    flags = os.environ.get("LIBTPU_INIT_ARGS", "").split()
    cap_name = MEMORY_ONLY_FLAG.split("=")[0]
    if not memory_only and any(f.startswith(cap_name) for f in flags):
        raise TopologyError(f"LIBTPU_INIT_ARGS caps the HBM ({' '.join(flags)}): unset it, or use --memory-only")
    os.environ["TPU_LIBRARY_PATH"] = path
    if memory_only and MEMORY_ONLY_FLAG not in flags:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(flags + [MEMORY_ONLY_FLAG])
    _started_memory_only[:] = [memory_only]
    return path


def slice_devices(name: str, memory_only: bool = False) -> Slice:
    """The abstract devices of a TPU slice, from libtpu (no TPU needed); a GPU cluster (``h100:2x8``) from jax's
    CUDA plugin (jaxvc/plan/gpus.py). ``memory_only``: libtpu with the 1 MiB HBM cap (``MEMORY_ONLY_FLAG``)."""
    from jaxvc.plan.gpus import gpu_slice, is_gpu_topology

    if is_gpu_topology(name):
        if memory_only:
            raise TopologyError(f"topology '{name}': --memory-only is for TPU slices (it caps libtpu's HBM)")
        return gpu_slice(name)
    generation, dims = parse_topology(name)
    use_libtpu(memory_only)
    # libtpu takes a machine-wide lock file so that two processes do not drive one TPU; the topology client drives
    # nothing, and several planners (or a planner beside a test) must be able to run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover - jax always has it
        raise TopologyError(f"jax.experimental.topologies is unavailable: {err}") from None
    canonical = f"{generation}:{'x'.join(map(str, dims))}"
    # Host bounds only decide which devices count as one process; 2x2x1 chips per host divides every slice >= 2x2.
    host = tuple(min(2, d) for d in dims) + (1,) * (3 - len(dims))
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=canonical,
                                                   chips_per_host_bounds=host)
    except Exception as err:  # libtpu missing, or a shape it rejects
        raise TopologyError(f"topology '{name}': libtpu could not describe it ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else err}); is the libtpu package "
                            f"installed?") from None
    devices = tuple(description.devices)
    chips = {tuple(getattr(d, "coords", (i,))) for i, d in enumerate(devices)}
    expected = 1
    for d in dims:
        expected *= d
    if len(chips) != expected:
        raise TopologyError(f"topology '{name}': libtpu returned {len(chips)} chips, expected {expected}")
    return Slice(canonical, CHIPS[generation], devices, len(chips))
