"""NVIDIA GPU clusters for ``jaxvc plan``: ``h100:2x8`` = 2 hosts of 8 H100s, as a ``Slice`` of abstract devices.

The devices come from a device-less CUDA topology (jax's CUDA plugin; no GPU or driver needed), described by the
GPU targets of ``jaxvc/bench/gpu_targets.py``. The planner then compiles the trainer's real sharded step for them
with XLA's GPU compiler, as it does for TPU slices with libtpu. Unlike the TPU compiler, XLA's device-less GPU compile
gives no cost analysis, so a GPU plan has memory and collectives but no FLOPs or roofline.
"""
from __future__ import annotations

import re

from jaxvc.bench.gpu_targets import TARGETS, resolve_target, topology_description
from jaxvc.plan.hardware import ChipSpec, Slice, TopologyError


def is_gpu_topology(name: str) -> bool:
    return (name or "").split(":")[0].strip().lower() in TARGETS


def parse_gpu_topology(name: str) -> tuple[str, int, int]:
    """``"h100:8"`` -> ``("h100", 1, 8)``; ``"h100:2x8"`` -> ``("h100", 2, 8)`` (hosts x GPUs per host)."""
    match = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(?:(\d+)\s*x\s*)?(\d+)\s*", (name or "").lower())
    if not match or match.group(1) not in TARGETS:
        raise TopologyError(f"topology '{name}': expected GPU:N or GPU:HOSTSxN such as h100:8 or h100:2x8 "
                            f"(GPUs: {', '.join(sorted(TARGETS))})")
    hosts, per_host = int(match.group(2) or 1), int(match.group(3))
    if hosts < 1 or per_host < 1:
        raise TopologyError(f"topology '{name}': hosts and GPUs per host must be >= 1")
    return match.group(1), hosts, per_host


def gpu_chip(generation: str) -> ChipSpec:
    """A GPU in the planner's terms; "ici" is NVLink (within a host: across hosts the network is slower)."""
    target = TARGETS[generation]
    return ChipSpec(generation, target.memory_bytes, target.peak_bf16_flops, target.memory_bandwidth,
                    target.nvlink_bandwidth)


def gpu_slice(name: str, cudnn: str = "9.19") -> Slice:
    """The abstract devices of a GPU cluster (one device per GPU)."""
    generation, hosts, per_host = parse_gpu_topology(name)
    try:
        description = topology_description(resolve_target(generation, cudnn=cudnn), hosts, per_host)
    except RuntimeError as error:
        raise TopologyError(f"topology '{name}': {error}") from None
    devices = tuple(description.devices)
    if len(devices) != hosts * per_host:
        raise TopologyError(f"topology '{name}': the CUDA plugin returned {len(devices)} devices, expected "
                            f"{hosts * per_host}")
    return Slice(f"{generation}:{hosts}x{per_host}", gpu_chip(generation), devices, len(devices))
