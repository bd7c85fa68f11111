"""Exact resumption: a run killed at a random point (SIGKILL, no warning) or preempted (SIGTERM: it saves and exits
cleanly) and then resumed ends with exactly the parameters and optimizer state of an uninterrupted run, because the
checkpoint holds the data iterator's position and the step's random key is derived from the step number.

The interrupted runs are real `jaxvc train` command lines in subprocesses; the uninterrupted reference and the
resumptions run in this process (same compiler options, so the same XLA programs).
"""
import os
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
from jaxvc.train import toy_data
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
