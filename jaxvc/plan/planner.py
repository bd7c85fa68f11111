"""Compile the real sharded train step for a TPU slice on this (CPU) machine and read off what the run would cost.

``plan_layout(config, method, tpu_slice, mesh_sizes)`` builds the trainer's own pieces (``jaxvc.train.loop.Trainer``:
mesh over the slice's abstract devices, parameter/optimizer-state shardings from the rule table, the jitted step
with donation) and compiles the step for abstract inputs (``jax.ShapeDtypeStruct`` with shardings; nothing is
initialised, no array is created). From the TPU executable:

* memory per device (``memory_analysis``): arguments, outputs, aliased (donated) bytes, temporaries, generated code;
  total = arguments + outputs - aliased + temporaries + code, compared with the device's HBM. When the TPU compiler
  itself refuses (it knows the chip's HBM and fails with RESOURCE_EXHAUSTED), that is reported as not fitting, with
  the compiler's own "used X of Y" figures;
* with ``jaxvc plan --memory-only`` (libtpu started with a 1 MiB HBM cap, ``hardware.MEMORY_ONLY_FLAG``) the compiler
  stops after planning its buffers and says how much it needs for temporaries; the estimate is those plus the
  arguments' bytes per device, computed from their shardings. Minutes instead of the half hour an SD1.5 step's code
  generation takes on a small CPU host, and in a fraction of its memory; not the exact figure (README);
* FLOPs and HBM bytes per device (``cost_analysis``), the collectives (``jaxvc.plan.hlo``);
* a roofline step time: max(FLOPs / peak, bytes accessed / HBM bandwidth) + ICI bytes / ICI bandwidth, and the
  MFU it implies (FLOPs here are the compiled step's, rematerialised recomputation included).
"""
from __future__ import annotations

import math
import re
import tempfile
import time
from typing import Mapping

import jax

from jaxvc.parallel.mesh import make_mesh, parse_axis_sizes
from jaxvc.parallel.rules import MESH_AXES
from jaxvc.plan.hardware import MEMORY_ONLY_HBM_BYTES, GiB, Slice
from jaxvc.plan.hlo import collectives


class PlanError(ValueError):
    """A layout that cannot be planned as asked (mesh size, batch divisibility)."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=32"`` -> ``{"data": 2, "fsdp": 32}`` (axes: data, fsdp, tensor, sequence; one may be -1)."""
    try:
        return parse_axis_sizes(text)
    except ValueError as err:
        raise PlanError(str(err)) from None


def resolve_mesh(sizes: Mapping[str, int], tpu_slice: Slice) -> dict[str, int]:
    """All four axes, the -1 filled in; the product must be the slice's device count."""
    devices = len(tpu_slice.devices)
    fixed = 1
    for a, s in sizes.items():
        if s != -1:
            fixed *= s
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise PlanError(f"mesh {dict(sizes)}: at most one axis may be -1")
    out = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    if fill:
        if devices % fixed:
            raise PlanError(f"mesh {dict(sizes)}: {tpu_slice.topology} has {devices} devices, not divisible by {fixed}")
        out[fill[0]] = devices // fixed
    elif fixed != devices:
        raise PlanError(f"mesh {dict(sizes)} has {fixed} devices but {tpu_slice.topology} has {devices} "
                        f"({tpu_slice.num_chips} chips x {tpu_slice.devices_per_chip} device(s) per chip)")
    return out


def mesh_label(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "data=1"


def _cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = dict(analysis or {})
    if not analysis:  # XLA's device-less GPU compile has no cost analysis
        return {"flops": None, "bytes_accessed": None, "transcendentals": None, "xla_optimal_seconds": None}
    return {"flops": float(analysis.get("flops", 0.0)),
            "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "transcendentals": float(analysis.get("transcendentals", 0.0)),
            "xla_optimal_seconds": float(analysis["optimal_seconds"]) if "optimal_seconds" in analysis else None}


def _memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    arguments = int(stats.argument_size_in_bytes)
    outputs = int(stats.output_size_in_bytes)
    aliased = int(stats.alias_size_in_bytes)
    temporaries = int(stats.temp_size_in_bytes)
    code = int(stats.generated_code_size_in_bytes)
    return {"arguments": arguments, "outputs": outputs, "aliased": aliased, "temporaries": temporaries,
            "generated_code": code, "total": arguments + outputs - aliased + temporaries + code}


_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
# The TPU compiler's two spellings: "Used 20.5G of 15.75G hbm" and
# "the total memory required for HLO temporaries (1.62T) exceeds available HBM (15.75G)".
_USED_OF = re.compile(r"[Uu]sed\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+hbm")
_REQUIRED = re.compile(r"required for ([\w ]+?)\s*\(" + _SIZE + r"\)\s*exceeds available HBM\s*\(" + _SIZE + r"\)")


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}[unit])


def out_of_memory(error: Exception) -> dict | None:
    """The compiler's "ran out of HBM" error as ``{"total", "capacity", "what", "message"}``, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    info = {"message": " ".join(text.split())[:500]}
    match = _USED_OF.search(text)
    if match:
        info.update(total=_bytes(*match.group(1, 2)), capacity=_bytes(*match.group(3, 4)), what="program")
    match = _REQUIRED.search(text)
    if match:
        info.update(total=_bytes(*match.group(2, 3)), capacity=_bytes(*match.group(4, 5)), what=match.group(1))
    return info


def _sharded_bytes(tree) -> int:
    """Bytes per device of abstract arrays with shardings (one shard each; the largest shard where uneven)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def roofline(flops: float, bytes_accessed: float, ici_bytes: float, tpu_slice: Slice) -> dict:
    """Step time (s) per the roofline: compute or HBM bound, plus interconnect time (not overlapped)."""
    compute_s = flops / tpu_slice.device_peak_flops
    memory_s = bytes_accessed / tpu_slice.device_hbm_bandwidth
    ici_s = ici_bytes / tpu_slice.device_ici_bandwidth
    step_s = max(compute_s, memory_s) + ici_s
    return {"compute_s": compute_s, "hbm_s": memory_s, "ici_s": ici_s, "step_s": step_s,
            "bound": "compute" if compute_s >= memory_s else "hbm",
            "mfu": compute_s / step_s if step_s > 0 else None}


def plan_layout(config, method, tpu_slice: Slice, mesh_sizes: Mapping[str, int],
                hbm_bytes: int | None = None, keep_hlo: bool = False) -> dict:
    """Compile ``config``'s train step for ``method`` on ``tpu_slice`` with this mesh; the report dict.

    ``config.batch_size`` is the global batch. ``hbm_bytes`` replaces the device's HBM capacity in the fit check.
    """
    with _platform_rules(tpu_slice):  # the trainer traces the model (its abstract state) as well as the step
        return _plan_layout(config, method, tpu_slice, mesh_sizes, hbm_bytes, keep_hlo)


def _plan_layout(config, method, tpu_slice: Slice, mesh_sizes: Mapping[str, int], hbm_bytes: int | None,
                 keep_hlo: bool) -> dict:
    from jaxvc.train import distributed
    from jaxvc.train.checkpoint import abstract_with_shardings
    from jaxvc.train.loop import Trainer
    from jaxvc.train.state import count_params, tree_bytes

    sizes = resolve_mesh(mesh_sizes, tpu_slice)
    mesh = make_mesh(sizes, devices=tpu_slice.devices)
    capacity = int(hbm_bytes) if hbm_bytes else tpu_slice.device_hbm_bytes
    batch_size = _video_batch_size(config)
    report = {"topology": tpu_slice.topology, "generation": tpu_slice.chip.generation,
              "chips": tpu_slice.num_chips, "devices": len(tpu_slice.devices), "mesh": sizes,
              "mesh_label": mesh_label(sizes), "global_batch": batch_size,
              "batch_per_chip": batch_size / tpu_slice.num_chips,
              "remat_policy": str(config.get("remat_policy", "none")),
              "compute_dtype": str(config.get("compute_dtype", "float32")),
              "frozen_dtype": str(config.get("frozen_dtype", "") or "float32"), "hbm_capacity": capacity}
    split = distributed.batch_axis_size(mesh, None if "rules" not in config else _rules(config))
    if batch_size % split:
        raise PlanError(f"global batch {batch_size} is not divisible by the {split}-way batch split of mesh "
                        f"{mesh_label(sizes)} (the batch is sharded over data x fsdp); pick a multiple of {split}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxvc-plan-") as workdir:
        trainer = Trainer(config, method, workdir, mesh=mesh)  # the workdir only hosts an unused checkpointer
        report["trainable_params"] = count_params(trainer.abstract_trainable)
        report["frozen_params"] = count_params(trainer.abstract_frozen)
        report["trainable_bytes"] = tree_bytes(trainer.abstract_trainable)
        report["frozen_bytes"] = tree_bytes(trainer.abstract_state.frozen)  # as stored (config.frozen_dtype)
        state = abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                         sharding=distributed.batch_sharding(mesh, len(v.shape), trainer.rules))
                 for k, v in method.example_batch(batch_size).items()}
        try:
            compiled = _compile(trainer, state, batch, report)
        except Exception as err:  # the TPU compiler rejects programs that overflow HBM
            report["compile_s"] = time.perf_counter() - start
            if not refused_for_memory(report, err, (state, batch), capacity):
                raise
            return report
        finally:
            trainer.checkpointer.close()
    report["compile_s"] = time.perf_counter() - start
    report.update(compiled_figures(compiled, tpu_slice, capacity, keep_hlo))
    step = report["roofline"]["step_s"] if report["roofline"] else 0
    report["samples_per_s"] = batch_size / step if step > 0 else None
    return report


def _video_batch_size(config) -> int:
    """The global batch the plan compiles: the method's example batch is a video batch, whose size is the video
    stream's own where switched streams have their own (method (e): ``data.batch_sizes.video``)."""
    sizes = (config.data.get("batch_sizes") if "data" in config else None) or {}
    return int(sizes.get("video", config.batch_size))


def refused_for_memory(report: dict, error: Exception, arguments, capacity: int) -> bool:
    """When ``error`` is the TPU compiler's "out of HBM", record it in ``report`` (with ``--memory-only``'s cap: the
    estimate, arguments from their shardings + the temporaries it planned) and return True."""
    oom = out_of_memory(error)
    if oom is None:
        return False
    report["compiler_capacity"] = oom.get("capacity")
    if oom.get("capacity") == MEMORY_ONLY_HBM_BYTES and oom.get("what") == "HLO temporaries":
        # --memory-only: the compiler stopped at the 1 MiB cap, after planning its temporaries
        argument_bytes = _sharded_bytes(arguments)
        report["memory"] = {"arguments": argument_bytes, "temporaries": oom["total"],
                            "total": argument_bytes + oom["total"], "estimate": True}
        report["fits"] = report["memory"]["total"] <= capacity
        return True
    # what the compiler counted (e.g. only the temporaries) is a lower bound of the program's total
    report["memory"] = {"total": oom.get("total"), "counted": oom.get("what")}
    report["fits"] = False
    report["error"] = oom["message"]
    return True


def compiled_figures(compiled, tpu_slice: Slice, capacity: int, keep_hlo: bool = False) -> dict:
    """A compiled program's memory per device and fit, FLOPs, collectives and roofline (the report's fields)."""
    memory = _memory(compiled)
    cost = _cost(compiled)
    text = compiled.as_text()
    comms = collectives(text, len(tpu_slice.devices))
    ici_bytes = sum(c["ici_bytes"] for c in comms.values())
    counted = cost["flops"] is not None
    # XLA's cost analysis does not see into custom kernels (the splash attention's Mosaic kernels): their FLOPs and
    # HBM traffic are missing from the FLOP columns and the roofline, which then under-estimate the step
    figures = dict(uncounted_kernels=text.count("tpu_custom_call"), memory=memory, fits=memory["total"] <= capacity,
                   cost=cost, collectives=comms, ici_bytes=ici_bytes, flops_per_device=cost["flops"],
                   flops_total=cost["flops"] * len(tpu_slice.devices) if counted else None,
                   roofline=roofline(cost["flops"], cost["bytes_accessed"], ici_bytes, tpu_slice) if counted
                   else None)
    if keep_hlo:
        figures["hlo_text"] = text
    return figures


def _is_gpu(tpu_slice: Slice) -> bool:
    return getattr(tpu_slice.devices[0], "platform", "") in ("cuda", "gpu")


def _platform_rules(tpu_slice: Slice):
    """On GPU devices: jax's cuDNN attention rules answered for that GPU (they ask the missing driver otherwise)."""
    import contextlib

    if not _is_gpu(tpu_slice):
        return contextlib.nullcontext()
    from jaxvc.bench.cross_lower import assume_cuda_device
    from jaxvc.bench.gpu_targets import TARGETS

    return assume_cuda_device(compute_capability=TARGETS[tpu_slice.chip.generation].compute_capability)


def _compile(trainer, state, batch, report: dict):
    """The trainer's compile; on GPU devices, jaxlib 0.10's Triton-GEMM tiling failure without a device to autotune
    on is retried with Triton GEMMs off (``compile_with_fallback``), and the report records it."""
    from jaxvc.bench.cross_lower import compile_with_fallback

    def compile(options):
        trainer.compiler_options = options
        return trainer.compile(state, batch)

    compiled, fallback = compile_with_fallback(compile, trainer.compiler_options)
    if fallback:
        report["compile_options"] = fallback
    return compiled


def _rules(config):
    from jaxvc.parallel.rules import rules_from_config

    return rules_from_config(config.get("rules") or ())

