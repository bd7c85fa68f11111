"""TensorBoard events for a run folder in a bucket, uploaded in bounded pieces.

tensorboardX writes ``gs://`` event files itself, but a bucket object cannot be appended to: its writer keeps the
whole file in memory and uploads all of it again at every flush (every 2 minutes). Over a days-long pod run whose
file holds sample images, that is a process that grows without bound and gigabytes uploaded again and again.

``BucketEvents`` writes the events to a local staging folder instead and copies the file being written to the
bucket (through ``jaxvc/storage.py``'s paths) at most every ``sync_secs`` and at flush/close. Once that file passes
``segment_bytes`` it is closed, copied a last time and deleted locally, and the next events go to a new file
(``events.out.tfevents.<time>.<host>.<segment>``): every upload is at most about one segment, and the local disk
holds one. TensorBoard reads every event file of a folder in name order, so the pieces read as one run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from jaxvc.storage import run_path


class BucketEvents:
    """The part of tensorboardX's ``SummaryWriter`` the trainer uses (``add_scalar``, ``add_image``, ``flush``,
    ``close``), for a bucket folder, writing tensorboardX's event files."""

    segment_bytes = 1 << 20  # a new event file past 1 MiB: each upload is at most about that
    sync_secs = 60.0  # the bucket lags the run by at most this (and by nothing after flush/close)

    def __init__(self, logdir: str | os.PathLike, segment_bytes: int | None = None, sync_secs: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.remote = run_path(logdir)
        self.remote.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = int(segment_bytes or self.segment_bytes)
        self.sync_secs = float(self.sync_secs if sync_secs is None else sync_secs)
        self.clock = clock
        self.staging = Path(tempfile.mkdtemp(prefix="jaxvc-events-"))
        self.segment = 0
        self.uploaded_bytes = 0  # what the uploads sent in all (for tests and curiosity)
        self._copied_size = -1  # the current file's size at its last upload
        self._writer = self._open()
        self._last_sync = clock()

    def _open(self):
        # tensorboardX's own event file, written in this thread: SummaryWriter hands events to a writer thread
        # through a queue that its flush() does not wait for, so an upload right after it could miss the last ones
        from tensorboardX.event_file_writer import EventsWriter

        return EventsWriter(str(self.staging / "events"), f".{self.segment:05d}")

    def _current_file(self) -> Path | None:
        files = sorted(self.staging.glob(f"events.out.tfevents.*.{self.segment:05d}"))
        return files[-1] if files else None

    def _add(self, summary, step: int) -> None:
        from tensorboardX.proto import event_pb2

        self._writer.write_event(event_pb2.Event(summary=summary, step=int(step), wall_time=time.time()))
        if self.clock() - self._last_sync >= self.sync_secs:
            self.sync()

    def _upload(self, local: Path) -> None:
        size = local.stat().st_size
        if size != self._copied_size:
            (self.remote / local.name).write_bytes(local.read_bytes())
            self.uploaded_bytes += size
            self._copied_size = size

    def sync(self) -> None:
        """Copy the file being written to the bucket; past ``segment_bytes``, close it and start the next."""
        self._writer.flush()
        local = self._current_file()
        if local is not None:
            self._upload(local)
            if local.stat().st_size >= self.segment_bytes:
                self._writer.close()
                local.unlink()
                self.segment += 1
                self._copied_size = -1
                self._writer = self._open()
        self._last_sync = self.clock()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._add(scalar(tag, float(value)), step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        from tensorboardX.summary import image as image_summary

        self._add(image_summary(tag, image, dataformats=dataformats), step)

    def flush(self) -> None:
        self.sync()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        local = self._current_file()
        if local is not None:
            self._upload(local)
        self._writer = None
        shutil.rmtree(self.staging, ignore_errors=True)
