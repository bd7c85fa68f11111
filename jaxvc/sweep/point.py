"""One sweep point: a real training run (``jaxvc/train/loop.py``) and what it measured, written as ``result.json``.

Runs in its own process, started by ``jaxvc sweep`` as ``python -m jaxvc.sweep.point SPEC.json``, because a point's
device count (``XLA_FLAGS=--xla_force_host_platform_device_count`` for simulated CPU devices) and its
``jax.distributed`` session are fixed when JAX starts.

Measured, per point:
* step time: the median interval between the trainer's requests for consecutive batches after ``warmup`` steps.
  The loop fetches step ``i-1``'s metrics right after dispatching step ``i``, so in steady state one interval is
  one step (data loading included, the compile and the final checkpoint excluded);
* samples/s = global batch / step time (and per chip); MFU = FLOPs per device / step time / peak
  (``jaxvc/train/metrics.py``: the device's table peak or ``--peak-flops``; none on a CPU without it);
* FLOPs per step from the compiled step's ``cost_analysis`` (per device, times the mesh size for the total);
  compute = FLOPs per step x steps;
* parameter counts (trainable, frozen), the loss curve and the final loss (mean of the last 20% of steps).
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

FINAL_LOSS_FRACTION = 0.2  # the final loss averages this fraction of the last steps (at least one)
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}  # CPU: compiles in seconds, runs a bit slower


class TimedStream:
    """Wraps the trainer's data iterator and notes when each batch is asked for."""

    def __init__(self, stream):
        self.stream = stream
        self.request_times: list[float] = []

    def __iter__(self):
        return self

    def __next__(self):
        self.request_times.append(time.perf_counter())
        return next(self.stream)

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state):
        self.stream.set_state(state)


def steady_step_times(request_times: list[float], warmup: int) -> list[float]:
    """Intervals between batch requests after ``warmup`` of them (the first intervals hold the compile)."""
    intervals = [b - a for a, b in zip(request_times, request_times[1:])]
    return intervals[warmup:]


def final_loss(losses: list[float]) -> float:
    finite = [x for x in losses if math.isfinite(x)]
    if not finite:
        return math.nan
    count = max(1, int(math.ceil(FINAL_LOSS_FRACTION * len(finite))))
    return float(sum(finite[-count:]) / count)


def build_config(spec: dict):
    """The point's config: the file, the fixed and point overrides, the model size, and the sweep's run settings."""
    from ml_collections import ConfigDict

    from jaxvc.config_utils import apply_overrides, load_config
    from jaxvc.sweep.sizes import apply_size

    config = load_config(spec["config"])
    apply_overrides(config, [tuple(kv) for kv in spec.get("overrides", [])])
    if spec.get("model"):
        apply_size(config, spec["model"])
    steps = int(spec["steps"])
    config.steps = steps
    config.log_every = steps  # one TensorBoard point at the end: logging syncs the host with the device
    config.sample_every = 0
    config.progress_bar = False
    if "checkpoint" in config:
        config.checkpoint.every = 0  # the loop still saves at the last step
        config.checkpoint.keep = 1
    if spec.get("mesh"):
        config.mesh = ConfigDict(dict(spec["mesh"]))
    if spec.get("peak_flops"):
        config.peak_flops_per_device = float(spec["peak_flops"])
    if spec.get("fast_compile"):
        config.compiler_options = ConfigDict(FAST_COMPILE_OPTIONS)
    return config


def mesh_devices(sizes: dict, devices: list) -> list:
    """The devices a layout runs on: all of them for a -1 axis, else the first ``prod(sizes)``."""
    if -1 in sizes.values():
        return devices
    count = math.prod(sizes.values())
    if count > len(devices):
        raise ValueError(f"mesh {sizes} needs {count} devices, this run has {len(devices)} (on CPU pass "
                         f"jaxvc sweep --devices {count} to simulate them)")
    return devices[:count]


def run_point(spec: dict) -> dict:
    """Train one point and return its record (also what ``result.json`` holds)."""
    import jax

    from jaxvc.data.training_streams import from_config as data_from_config  # noqa: F401 (fails early if absent)
    from jaxvc.methods import build_method
    from jaxvc.parallel.mesh import make_mesh
    from jaxvc.train import cli as train_cli
    from jaxvc.train.loop import Trainer
    from jaxvc.train.metrics import mfu, peak_flops_per_device
    from jaxvc.train.state import count_params
    from jaxvc.sweep.sizes import unet_field

    started = time.perf_counter()
    config = build_config(spec)
    sizes = dict(config.mesh.to_dict()) if "mesh" in config else {"data": -1}
    mesh = make_mesh(sizes, devices=mesh_devices(sizes, jax.devices()))
    method = build_method(config)
    trainer = Trainer(config, method, spec["workdir"], mesh=mesh)
    streams: list[TimedStream] = []

    def data(rows):
        streams.append(TimedStream(train_cli.build_data(config, rows)))
        return streams[0]

    result = trainer.fit(data)
    if result.preempted:
        raise RuntimeError(f"point {spec.get('point_id')}: stopped by SIGTERM after step {result.final_step}; "
                           f"`jaxvc sweep --resume` runs it again from the start")
    if result.start_step != 0:
        raise RuntimeError(f"point {spec.get('point_id')}: the run folder {spec['workdir']} held a checkpoint at step "
                           f"{result.start_step}; a point's timing and loss curve need a fresh run")
    warmup = int(spec.get("warmup", 2))
    intervals = steady_step_times(streams[0].request_times, warmup)
    if not intervals:
        raise ValueError(f"point {spec.get('point_id')}: {config.steps} steps leave no step after {warmup} warm-up "
                         f"steps to time; use --steps >= {warmup + 2}")
    step_time = statistics.median(intervals)
    chips = int(mesh.devices.size)
    per_device = trainer.flops_per_step
    peak = peak_flops_per_device(mesh.devices.flat[0], config.get("peak_flops_per_device"))
    losses = [h["loss"] for h in result.history]
    total_flops = per_device * chips if per_device else None
    return {
        "id": spec.get("point_id", ""),
        "values": spec.get("values", {}),
        "status": "done",
        "model": spec.get("model") or "",
        "unet_block_out_channels": _widths(config, unet_field),
        "batch_size": int(config.batch_size),
        "lr": float(config.optim.lr),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "chips": chips,
        "processes": jax.process_count(),
        "device_kind": mesh.devices.flat[0].device_kind,
        "steps": int(result.final_step),
        "params_trainable": count_params(trainer.abstract_trainable),
        "params_total": count_params(trainer.abstract_trainable) + count_params(trainer.abstract_frozen),
        "flops_per_step_per_device": per_device,
        "flops_per_step": total_flops,
        "compute_flops": total_flops * result.final_step if total_flops else None,
        "step_time_s": step_time,
        "step_time_min_s": min(intervals),
        "step_time_max_s": max(intervals),
        "timed_steps": len(intervals),
        # compile + the first step (+ the first batch): what each point costs before it is timed
        "first_step_s": streams[0].request_times[1] - streams[0].request_times[0],
        "samples_per_s": config.batch_size / step_time,
        "samples_per_s_per_chip": config.batch_size / step_time / chips,
        "mfu": mfu(per_device, step_time, peak),
        "peak_flops_per_device": peak,
        "final_loss": final_loss(losses),
        "loss_curve": [[int(h["step"]), float(h["loss"])] for h in result.history],
        "wall_s": time.perf_counter() - started,
    }


def _widths(config, unet_field) -> list[int]:
    """The UNet's block_out_channels (empty for configs without a UNet, e.g. the toy method)."""
    try:
        return [int(c) for c in unet_field(config, "block_out_channels")]
    except (AttributeError, KeyError, ValueError):
        return []


def write_json(path: Path, record: dict) -> None:
    """Write atomically (a reader never sees half a file; a killed point leaves no result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def host_marker(point_dir: Path) -> Path:
    """Every host's own "this point is done" file (hosts of a pod may not share the output folder)."""
    return point_dir / f"done.{socket.gethostname()}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jaxvc.sweep.point SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    point_dir = Path(spec["point_dir"])
    from jaxvc.train import distributed

    options = spec.get("distributed") or {}
    mode = options.get("mode", "env")
    if mode != "off":
        distributed.initialize(options.get("coordinator_address"), options.get("num_processes"),
                               options.get("process_id"), auto=mode == "auto")
    import jax

    try:
        record = run_point(spec)
    except Exception as err:  # the sweep records the failure and goes on with the other points
        if jax.process_index() == 0:
            write_json(point_dir / "failed.json", {
                "id": spec.get("point_id", ""), "values": spec.get("values", {}), "status": "failed",
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]})
        print(f"jaxvc sweep: point {spec.get('point_id')} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        (point_dir / "failed.json").unlink(missing_ok=True)
        write_json(point_dir / "result.json", record)
    host_marker(point_dir).write_text(f"process {jax.process_index()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
