"""Exact resumption: a run killed at a random point (SIGKILL, no warning) or preempted (SIGTERM: it saves and exits
cleanly) and then resumed ends with exactly the parameters and optimizer state of an uninterrupted run, because the
checkpoint holds the data iterator's position and the step's random key is derived from the step number.

The interrupted runs are real `jaxvc train` command lines in subprocesses; the uninterrupted reference and the
resumptions run in this process (same compiler options, so the same XLA programs).

A resume whose config does not fit the checkpoint (its state layout or its data position) is refused naming the
changed config keys; one that fits lists them (jaxvc/train/config_changes.py).
"""
import argparse
import os
import shutil
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxvc.config_utils import get_config
from jaxvc.methods.toy_denoiser import ToyDenoiser
from jaxvc.train import cli as train_cli
from jaxvc.train import toy_data
from jaxvc.train.config_changes import ResumeMismatchError, config_changes, resume_notice
from jaxvc.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
OVERRIDES = [f"steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "model.num_blocks=1",
             "compiler_options={'xla_backend_optimization_level': 0}", "matmul_precision=highest",
             "progress_bar=false", "optim.ema_decay=0.9"]


def config():
    return get_config("configs/toy.py:tiny", OVERRIDES)


def run_in_process(workdir):
    cfg = config()
    return train(cfg, ToyDenoiser(cfg), lambda rows: toy_data.from_config(cfg, rows), workdir)


def start_cli(workdir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "jaxvc.cli", "train", "--config", "configs/toy.py:tiny", "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in OVERRIDES]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, workdir, at_least, timeout=240):
    folder = Path(workdir) / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if folder.exists() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"training exited early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def leaves(state):
    return jax.tree.leaves(jax.device_get((state.params, state.frozen, state.opt_state, state.ema, state.step,
                                           state.opt_steps)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = run_in_process(tmp_path_factory.mktemp("reference"))
    assert result.final_step == STEPS
    return result


def assert_exactly_equal(resumed, reference):
    assert resumed.final_step == STEPS
    for a, b in zip(leaves(resumed.state), leaves(reference.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the replayed steps saw the same batches and keys: their losses are bitwise the reference's
    ref_losses = {h["step"]: h["loss"] for h in reference.history}
    for h in resumed.history:
        assert h["loss"] == ref_losses[h["step"]], h["step"]


def test_sigkill_at_a_random_step_then_resume_is_exact(reference, tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    target, delay = rng.choice([2, 4, 6, 8]), rng.uniform(0.0, 0.05)
    proc = start_cli(tmp_path)
    wait_for_checkpoint(proc, tmp_path, target)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = run_in_process(tmp_path)
    print(f"killed after checkpoint >= {target} (+{delay:.3f}s); resumed from step {resumed.start_step}")
    assert 0 < resumed.start_step < STEPS, (target, delay, resumed.start_step)
    assert_exactly_equal(resumed, reference)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(reference, tmp_path):
    proc = start_cli(tmp_path)
    wait_for_checkpoint(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "on SIGTERM" in out, out
    stopped = int(out.split("stopped at step ")[1].split()[0])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved[-1] == stopped, (saved, stopped)  # the preemption checkpoint is the step it stopped at
    print(f"SIGTERM: stopped at step {stopped}, checkpoints {saved}")
    if stopped < STEPS:
        resumed = run_in_process(tmp_path)
        assert resumed.start_step == stopped
        assert_exactly_equal(resumed, reference)


# ------------------------------------------------------------------------------- resuming with another config
SHORT = ["steps=2", "checkpoint.every=2", "checkpoint.use_async=False", "model.num_blocks=1",
         "compiler_options={'xla_backend_optimization_level': 0}", "progress_bar=false"]


def train_short(workdir, *overrides):
    cfg = get_config("configs/toy.py:tiny", SHORT + list(overrides))
    return train(cfg, ToyDenoiser(cfg), lambda rows: toy_data.from_config(cfg, rows), workdir)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A toy run (no EMA, frozen weights in the checkpoints) trained 2 steps: its checkpoint is at step 2."""
    workdir = tmp_path_factory.mktemp("two_steps")
    result = train_short(workdir)
    assert result.final_step == 2
    return workdir, result.state


@pytest.fixture
def run_copy(two_steps, tmp_path):
    """The 2-step run, copied: each test resumes its own."""
    return Path(shutil.copytree(two_steps[0], tmp_path / "run"))


@pytest.mark.parametrize("override, what, change", [
    ("optim.ema_decay=0.9", "this run keeps EMA weights the checkpoint does not hold", "optim.ema_decay: None -> 0.9"),
    ("model.features=16", "laid out differently from the checkpoint's in the parameters, optimizer state and frozen "
                          "weights (params/params/blocks_0/conv1/bias: shape (8,) in the checkpoint, shape (16,) in "
                          "this run)", "model.features: 8 -> 16"),
    ("optim.name=lion", "laid out differently from the checkpoint's in the optimizer state", "optim.name: 'adamw' -> "
                                                                                             "'lion'"),
    ("batch_size=4", "the data iterator's saved position does not fit this run's data ('toy data: checkpointed "
                     "iterator state has global_batch_size=8, but this run uses global_batch_size=4",
     "batch_size: 8 -> 4"),
], ids=["ema", "features", "optimizer", "batch_size"])
def test_a_config_that_does_not_fit_the_checkpoint_is_refused_naming_the_changed_keys(run_copy, override, what,
                                                                                      change):
    written = (run_copy / "config.json").read_text()
    with pytest.raises(ResumeMismatchError) as refused:
        train_short(run_copy, "steps=4", override)
    message = str(refused.value)
    assert message.startswith(f"cannot resume from the checkpoint at step 2 in {run_copy / 'checkpoints'}: "), message
    assert what in message, message
    # the key that decides the part first, then the other changes; old -> new values; what to do
    assert f"; config changed since that checkpoint: {change}, steps: 2 -> 4. To continue, resume with the " \
           "checkpoint's values for these keys, or train with this config in a new --workdir" in message, message
    assert "\n" not in message
    assert (run_copy / "config.json").read_text() == written  # a refused resume leaves the run as it was


def test_jaxvc_train_prints_a_refused_resume_as_one_line_and_exits_2(run_copy, capsys):
    parser = argparse.ArgumentParser(prog="jaxvc train")
    train_cli.add_arguments(parser)
    overrides = [f"--config.{o}" for o in SHORT + ["model.features=16"]]
    args = parser.parse_args(["--config", "configs/toy.py:tiny", "--workdir", str(run_copy), "--distributed", "off",
                              *overrides])
    assert train_cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxvc train: cannot resume from the checkpoint at step 2") and err.count("\n") == 1, err
    assert "Traceback" not in err and "model.features: 8 -> 16" in err, err


def test_a_config_change_that_fits_is_resumed_and_listed_by_dotted_key(two_steps, run_copy, capsys):
    """optim.lr, seed and checkpoint.save_frozen (true -> false: the checkpoint's frozen weights are still read) fit;
    the notice names each key with its old and new value, and says what a new seed does not change."""
    result = train_short(run_copy, "steps=4", "optim.lr=5e-4", "seed=3", "checkpoint.save_frozen=False")
    assert (result.start_step, result.final_step) == (2, 4)
    out = capsys.readouterr().out
    assert ("jaxvc train: resuming from step 2 with config changes: checkpoint.save_frozen: True -> False, "
            "optim.lr: 0.001 -> 0.0005, seed: 0 -> 3, steps: 2 -> 4\n") in out, out
    assert "jaxvc train: seed changed: training randomness does not (the train key comes from the checkpoint)" in out
    # the frozen weights are the checkpoint's, not made again by the method from seed 3
    for a, b in zip(jax.tree.leaves(result.state.frozen), jax.tree.leaves(two_steps[1].frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_notice_says_what_a_changed_weight_path_does():
    """Weights are read from a changed model.pretrained only where the checkpoint does not hold the frozen ones."""
    changes = config_changes({"model": {"pretrained": "/old", "tokenizer": "/t"}, "optim": {}},
                             {"model": {"pretrained": "/new", "tokenizer": "/t2"}, "optim": {"lr": 1e-4}})
    assert changes == [("model.pretrained", "/old", "/new"), ("model.tokenizer", "/t", "/t2"),
                       ("optim.lr", changes[2][1], 1e-4)] and repr(changes[2][1]) == "(unset)"
    held = resume_notice(7, changes, frozen_in_checkpoint=True)
    assert held == ["resuming from step 7 with config changes: model.pretrained: '/old' -> '/new', model.tokenizer: "
                    "'/t' -> '/t2', optim.lr: (unset) -> 0.0001",
                    "model.pretrained changed, but no weights are loaded from it: the checkpoint holds the frozen and "
                    "the trained weights"]
    assert "the frozen weights are read from the new value" in resume_notice(7, changes, False)[1]


class _FailingData:
    """The toy data, whose ``next`` fails at batch ``at``; with ``sigterm``, as a Grain iterator whose worker
    processes got the process group's SIGTERM: this process receives the signal too, then the batch fails."""

    def __init__(self, data, at, sigterm):
        self.data, self.at, self.sigterm, self.served = data, at, sigterm, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.served == self.at:
            if self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("Worker process was terminated unexpectedly with exit code -15.")
        self.served += 1
        return next(self.data)

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state):
        self.data.set_state(state)


def test_sigterm_that_also_stops_the_data_workers_saves_the_steps_done(reference, tmp_path):
    """`launch/common.sh` stops a run with SIGTERM to its process group, which ends Grain's worker processes before
    the loop's between-steps check: the batch being made is lost, the steps done are saved, and the resumed run
    is the uninterrupted one. The same data error without a SIGTERM is the run's error."""
    cfg = config()
    data = lambda sigterm: lambda rows: _FailingData(toy_data.from_config(cfg, rows), 5, sigterm)  # noqa: E731
    stopped = train(cfg, ToyDenoiser(cfg), data(True), tmp_path)
    assert stopped.preempted and stopped.final_step == 5
    assert max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == 5
    assert_exactly_equal(run_in_process(tmp_path), reference)
    with pytest.raises(RuntimeError, match="terminated unexpectedly"):
        train(cfg, ToyDenoiser(cfg), data(False), tmp_path / "other")
