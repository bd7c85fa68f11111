"""Profiler traces of chosen training steps (``config.profile``): where a step's time and memory go.

A trace of a few steady-state steps shows the ops, the collectives and the host gaps between steps (TensorBoard's
Profile tab, XProf or Perfetto read it); a device memory profile (pprof) shows what holds device memory when a
layout is close to running out of it. Both are opt-in: ``profile.steps = 0`` (the default) records nothing.

* ``profile.skip_steps``: steps this process runs before the trace starts, so that compilation, the first steps'
  warm-up and a resumed run's restore stay out of it (counted from where this process started or resumed);
* ``profile.steps``: how many steps the trace covers; it stops once the last of them has finished on the device,
  or when the run ends first (finished, preempted or failed);
* ``profile.dir``: where the traces go; "" means ``<workdir>/tensorboard``, where TensorBoard's profile plugin
  finds them (``plugins/profile/<timestamp>/<host>.xplane.pb``);
* ``profile.all_hosts``: every process writes its own trace (default: process 0 only);
* ``profile.memory``: also save a device memory profile after the last traced step
  (``memory_step_<N>.prof`` in the profile folder, ``memory_step_<N>_process<I>.prof`` with several processes);
* ``profile.server_port``: > 0 runs JAX's profiler server on that port for the whole run, for on-demand capture
  (TensorBoard's "Capture profile", XProf) of a run that is already going.

Every step runs inside ``StepTraceAnnotation("train", step_num=N)``, N the step count after it (the x axis of the
TensorBoard scalars), so the trace viewer groups the device work by step; it costs nothing while no trace records.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax

from jaxvc.storage import is_remote, run_path


def _setting(section, name: str, default):
    value = section.get(name, default) if section is not None else default
    return default if value is None else value


class StepProfiler:
    """Starts and stops the trace around the steps ``config.profile`` names; ``close()`` ends any trace left open."""

    def __init__(self, section, workdir: str | Path):
        self.skip = int(_setting(section, "skip_steps", 5))
        self.steps = int(_setting(section, "steps", 0))
        self.memory = bool(_setting(section, "memory", False))
        self.port = int(_setting(section, "server_port", 0))
        all_hosts = bool(_setting(section, "all_hosts", False))
        for name, value in (("skip_steps", self.skip), ("steps", self.steps)):
            if value < 0:
                raise ValueError(f"config.profile.{name} must be >= 0, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"config.profile.server_port must be a TCP port (1-65535) or 0 for none, got {self.port}")
        if self.memory and self.steps == 0:
            raise ValueError("config.profile.memory saves the device memory after the last traced step: set "
                             "config.profile.steps > 0")
        self.directory = run_path(_setting(section, "dir", "") or run_path(workdir) / "tensorboard")
        self.enabled = self.steps > 0 and (all_hosts or jax.process_index() == 0)
        self.first = self.last = -1  # 0-based indices of the first and last traced steps (set by ``start``)
        self.recording = False
        self.staging = None  # the local folder a trace for a bucket is written to first
        self.server = False

    def start(self, start_step: int) -> "StepProfiler":
        """The window counts from ``start_step``, where this process starts or resumes; use as a context."""
        self.first = start_step + self.skip
        self.last = self.first + self.steps - 1
        return self

    def __enter__(self):
        if self.port:
            jax.profiler.start_server(self.port)
            self.server = True
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def annotation(self, step_index: int):
        """The context a step's call runs in (``step_index`` = the state's step before it)."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step_index + 1)

    def before_step(self, step_index: int) -> None:
        if self.enabled and step_index == self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            # a bucket (gs://...): the profiler writes a local folder, copied into the bucket when the trace stops
            self.staging = tempfile.mkdtemp(prefix="jaxvc-profile-") if is_remote(self.directory) else None
            jax.profiler.start_trace(self.staging or os.fspath(self.directory))
            self.recording = True

    def after_step(self, step_index: int, state) -> str | None:
        """Ends the trace after its last step, once that step's device work is done; returns a line to print then."""
        if not (self.recording and step_index == self.last):
            return None
        jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
        self._stop()
        message = f"profile: steps {self.first + 1}-{self.last + 1} traced into {self.directory}"
        if self.memory:
            suffix = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
            path = self.directory / f"memory_step_{self.last + 1:08d}{suffix}.prof"
            path.write_bytes(jax.profiler.device_memory_profile())  # pprof, gzipped; local or in a bucket
            message += f"; device memory in {path}"
        return message

    def _stop(self) -> None:
        self.recording = False
        jax.profiler.stop_trace()
        if self.staging:
            for file in sorted(Path(self.staging).rglob("*")):
                if file.is_file():
                    target = self.directory / file.relative_to(self.staging).as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(file.read_bytes())
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def close(self) -> None:
        """A run that ends inside the window still gets the trace of the steps it ran."""
        if self.recording:
            self._stop()
        if self.server:
            self.server = False
            jax.profiler.stop_server()


def trace_files(directory: str | Path) -> list[Path]:
    """The ``.xplane.pb`` traces under a profile folder, oldest run first."""
    return sorted(run_path(directory).glob("plugins/profile/*/*.xplane.pb"))
