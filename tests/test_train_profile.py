"""``config.profile``: the trainer traces exactly the steps it names (counted from where the process starts or
resumes), saves a device memory profile after them, ends a trace the run does not finish, leaves training
unchanged, and refuses bad settings by name. And the input pipeline's share of the step time it logs."""
import gzip
import socket
import time

import jax
import numpy as np
import pytest

from jaxvc.config_utils import get_config
from jaxvc.methods.toy_denoiser import ToyDenoiser
from jaxvc.train import toy_data
from jaxvc.train.loop import Trainer, train
from jaxvc.train.profiling import trace_files

FAST = ["compiler_options={'xla_backend_optimization_level': 0}", "model.num_blocks=1", "progress_bar=false",
        "checkpoint.every=0"]


def run(workdir, *overrides):
    config = get_config("configs/toy.py:tiny", FAST + list(overrides))
    return train(config, ToyDenoiser(config), lambda rows: toy_data.from_config(config, rows), workdir)


def traced_steps(trace) -> list[int]:
    """The step numbers of the "train" step annotations recorded in a trace file."""
    steps = []
    for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
        for line in plane.lines:
            steps += [dict(event.stats)["step_num"] for event in line.events if event.name == "train"]
    return sorted(steps)


def test_trace_covers_the_chosen_steps_and_memory_is_saved(tmp_path):
    profiled = run(tmp_path / "profiled", "steps=5", "profile.steps=2", "profile.skip_steps=1",
                   "profile.memory=true")
    traces = trace_files(tmp_path / "profiled" / "tensorboard")  # where TensorBoard's Profile tab looks
    assert len(traces) == 1 and traces[0].stat().length > 0
    assert traced_steps(traces[0]) == [2, 3]  # steps 1, 4 and 5 ran outside the trace
    memory = tmp_path / "profiled" / "tensorboard" / "memory_step_00000003.prof"
    with gzip.open(memory) as f:  # pprof: a gzipped profile proto
        assert len(f.read()) > 0
    # tracing does not change what is trained
    plain = run(tmp_path / "plain", "steps=5")
    assert [h["loss"] for h in profiled.history] == [h["loss"] for h in plain.history]


def test_window_counts_from_the_resume_and_a_run_that_ends_inside_it_keeps_its_trace(tmp_path):
    run(tmp_path, "steps=2")
    resumed = run(tmp_path, "steps=4", "profile.steps=10", "profile.skip_steps=1", f"profile.dir={tmp_path / 'p'}")
    assert resumed.start_step == 2
    traces = trace_files(tmp_path / "p")
    assert len(traces) == 1 and traced_steps(traces[0]) == [4]  # step 3 was the one skipped after the resume
    jax.profiler.start_trace(str(tmp_path / "again"))  # the run stopped its trace: a new one can start
    jax.profiler.stop_trace()


@pytest.mark.parametrize("override, message", [
    ("profile.steps=-1", "config.profile.steps must be >= 0"),
    ("profile.skip_steps=-2", "config.profile.skip_steps must be >= 0"),
    ("profile.memory=true", "set config.profile.steps > 0"),
    ("profile.server_port=70000", "config.profile.server_port must be a TCP port"),
])
def test_bad_settings_are_refused_by_name(tmp_path, override, message):
    config = get_config("configs/toy.py:tiny", FAST + [override])
    with pytest.raises(ValueError, match=message):
        Trainer(config, ToyDenoiser(config), tmp_path)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class ProbingStream:
    """The toy stream, which checks at each batch whether the profiler server answers on ``port``."""

    def __init__(self, inner, port):
        self.inner, self.port, self.answered = inner, port, []

    def __next__(self):
        self.answered.append(_listening(self.port))
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_profiler_server_runs_for_the_run_only(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = get_config("configs/toy.py:tiny", FAST + ["steps=2", f"profile.server_port={port}"])
    stream = ProbingStream(toy_data.from_config(config, (0, config.batch_size)), port)
    train(config, ToyDenoiser(config), stream, tmp_path)
    assert stream.answered == [True, True] and not _listening(port)


class SlowStream(ProbingStream):
    """The toy stream, 0.3 s per batch: an input-bound run."""

    def __next__(self):
        time.sleep(0.3)
        return next(self.inner)


def test_time_waiting_for_the_input_pipeline_is_logged(tmp_path):
    from tests.test_train_step import read_scalars

    config = get_config("configs/toy.py:tiny", FAST + ["steps=3", "log_every=1"])
    stream = SlowStream(toy_data.from_config(config, (0, config.batch_size)), 0)
    train(config, ToyDenoiser(config), stream, tmp_path)
    scalars = read_scalars(tmp_path / "tensorboard")
    wait = [v for _, v in scalars["perf/data_wait_s"]]
    fraction = [v for _, v in scalars["perf/data_wait_fraction"]]
    step_time = [v for _, v in scalars["perf/step_time_s"]]
    assert len(wait) == 3 and all(w >= 0.3 for w in wait)  # each step waited out the stream's sleep
    assert all(0 < f <= 1 for f in fraction)
    np.testing.assert_allclose(np.array(fraction) * step_time, wait, rtol=1e-5)


def test_no_trace_unless_asked_and_the_compiled_step_is_described(tmp_path, capsys):
    result = run(tmp_path, "steps=2")
    assert np.isfinite(result.history[-1]["loss"]) and trace_files(tmp_path / "tensorboard") == []
    printed = capsys.readouterr().out
    assert "jaxvc train: compiled the step for video (8, 2, 8, 8, 3) in " in printed
    assert " GFLOP per device per step; XLA plans " in printed
