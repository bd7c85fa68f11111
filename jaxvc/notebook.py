"""Helpers for the notebooks in ``notebooks/``: fast CPU compiles, inline videos, reading TensorBoard scalars back.

Importing this module does not import JAX, so ``use_fast_cpu_compiles()`` can still set ``XLA_FLAGS`` before the
backend starts.
"""
from __future__ import annotations

import base64
import glob
import html
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

# XLA:CPU compiles the UNet's graphs about 3-4x faster at optimization level 0 and runs them a little slower: the right
# trade for a tiny model run once on a CPU. Accelerators keep their default (full) optimization.
FAST_CPU_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def accelerator_present() -> bool:
    """A TPU (``/dev/accel*``, ``/dev/vfio/N``, Colab's ``COLAB_TPU_ADDR``) or an NVIDIA GPU (``/dev/nvidiaN``) is
    attached. Checked from device files, without starting JAX."""
    if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME"):
        return True
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def use_fast_cpu_compiles() -> bool:
    """On a machine without an accelerator, add ``FAST_CPU_COMPILE_FLAGS`` to ``XLA_FLAGS``; returns whether it did.

    Must run before JAX starts its backend (XLA reads the flags once); raises if it already has.
    """
    if accelerator_present():
        return False
    jax = sys.modules.get("jax")
    if jax is not None and _backend_started(jax):
        raise RuntimeError("use_fast_cpu_compiles(): JAX's backend is already running, so XLA_FLAGS would be "
                           "ignored; call it before the first jax.devices() / computation (restart the kernel)")
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in FAST_CPU_COMPILE_FLAGS if f not in flags])
    return True


def _backend_started(jax) -> bool:
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", None))
    except ImportError:  # private module moved: assume the worst only if jax has computed anything
        return False


def video_bytes(frames, kind: str = "mp4", fps: int = 8, min_size: int = 128) -> bytes:
    """The encoded bytes of a (F, H, W, 3) video (uint8 or floats in [-1, 1]) as ``mp4`` or ``gif``
    (``jaxvc.media``)."""
    from jaxvc import media

    writers = {"mp4": media.write_mp4, "gif": media.write_gif}
    if kind not in writers:
        raise ValueError(f"video kind must be 'mp4' or 'gif', got {kind!r}")
    with tempfile.TemporaryDirectory() as folder:
        path = writers[kind](Path(folder) / f"video.{kind}", frames, fps=fps, min_size=min_size)
        return path.read_bytes()


def video_html(frames, kind: str = "mp4", fps: int = 8, width: int = 256, caption: str | None = None) -> str:
    """An HTML snippet playing the video inline (base64 data URI): a looping ``<video>`` (mp4) or an ``<img>`` (gif).
    Self-contained, so it survives saving the notebook and works in Colab, Jupyter and VS Code."""
    data = base64.b64encode(video_bytes(frames, kind, fps)).decode("ascii")
    if kind == "mp4":
        body = (f'<video width="{width}" autoplay loop muted playsinline controls '
                f'src="data:video/mp4;base64,{data}"></video>')
    else:
        body = f'<img width="{width}" src="data:image/gif;base64,{data}"/>'
    label = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure style="display:inline-block;margin:4px">{body}{label}</figure>'


def show_videos(videos, captions=None, kind: str = "mp4", fps: int = 8, width: int = 256) -> str:
    """Display several videos side by side in the notebook (one HTML output); returns the HTML."""
    from IPython.display import HTML, display

    captions = list(captions) if captions is not None else [None] * len(videos)
    if len(captions) != len(videos):
        raise ValueError(f"show_videos: {len(videos)} videos but {len(captions)} captions")
    snippet = "".join(video_html(v, kind, fps, width, c) for v, c in zip(videos, captions))
    display(HTML(snippet))
    return snippet


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``: ``{tag: [(step, value), ...]}`` in file order.

    Reads the TFRecord framing (length, CRC, event proto, CRC) with tensorboardX's protobuf classes, so it needs
    neither TensorFlow nor TensorBoard."""
    from tensorboardX.proto import event_pb2

    from jaxvc.storage import is_remote, run_path

    name = "events.out.tfevents.*"
    if is_remote(logdir):  # epath's glob takes no "**" (a listing per folder): the folder and its subfolders
        files = sorted(path for pattern in (name, f"*/{name}") for path in run_path(logdir).glob(pattern))
    else:
        files = sorted(Path(logdir).glob(f"**/{name}"))
    if not files:
        raise FileNotFoundError(f"{logdir}: no TensorBoard event files (events.out.tfevents.*)")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            record = data[offset + 12: offset + 12 + length]
            offset += 12 + length + 4
            if len(record) < length:
                break  # a record still being written
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (same length as ``values``; the first points average fewer)."""
    values = np.asarray(values, np.float64)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sums = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts
