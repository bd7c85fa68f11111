"""What the loop reports: TensorBoard scalars and sample videos, throughput and MFU.

MFU = (FLOPs of one compiled step on one device, from XLA's ``cost_analysis``) / (step time) / (the device's peak
FLOP/s). The peak comes from ``config.peak_flops_per_device`` or from the table below (dense bf16 matmul peaks from
the vendors' data sheets); a device not in the table (a CPU) gets no MFU unless the config gives a peak.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from jaxvc.storage import is_remote, run_path

# device_kind substring (lower case) -> dense bf16 peak FLOP/s per device (one chip; for TPU v2/v3 one core).
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5p", 459e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v4", 275e12),
    ("v3", 61.5e12),
    ("v2", 22.5e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops_per_device(device=None, override: float | None = None) -> float | None:
    """The device's peak FLOP/s (``override`` wins), or None when unknown."""
    if override:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs per device of one call of a compiled (SPMD-partitioned) function, or None if XLA gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def compiled_memory_bytes(compiled) -> int | None:
    """What XLA planned per device for one call of a compiled function: arguments + outputs + temporaries - aliased
    (donated) buffers; None where the backend gives no memory analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:
        return None
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def format_bytes(count: int) -> str:
    """1.23 GiB, or 4.1 MiB below a GiB (an optimizer state, a tiny model's memory plan)."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def mfu(flops_per_step: float | None, step_seconds: float, peak: float | None) -> float | None:
    if not flops_per_step or not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak


class MetricWriter:
    """TensorBoard scalars/images through tensorboardX on process 0 (a no-op elsewhere)."""

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            if is_remote(logdir):  # staged locally, uploaded in pieces (not tensorboardX's whole-file re-uploads)
                from jaxvc.train.bucket_events import BucketEvents

                self.writer = BucketEvents(logdir)
            else:
                Path(logdir).mkdir(parents=True, exist_ok=True)
                self.writer = SummaryWriter(os.fspath(logdir))

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.writer:
            return
        for name, value in values.items():
            if value is None:
                continue
            self.writer.add_scalar(name, float(value), step)

    def videos(self, step: int, videos: Mapping[str, np.ndarray], folder: str | os.PathLike) -> list[Path]:
        """Write each (N, F, H, W, 3) video batch (float in [-1, 1] or uint8) as GIFs, and a frame strip image."""
        if not self.enabled:
            return []
        from jaxvc.media import to_uint8, write_gif

        folder = run_path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, batch in videos.items():
            batch = to_uint8(np.asarray(batch))
            if batch.ndim != 5 or batch.shape[-1] != 3:
                raise ValueError(f"method.sample returned '{name}' with shape {batch.shape}; expected "
                                 f"(N, F, H, W, 3) videos")
            for i, video in enumerate(batch):
                written.append(write_gif(folder / f"{name}_{i}.gif", video))
            if self.writer:
                # rows = samples, columns = frames
                strip = np.concatenate([np.concatenate(list(video), axis=1) for video in batch], axis=0)
                self.writer.add_image(f"samples/{name}", strip, step, dataformats="HWC")
        return written

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
