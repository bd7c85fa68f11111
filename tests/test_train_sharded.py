"""Sharded training equals unsharded training (8 simulated CPU devices), and checkpoints restore onto other meshes.

One subprocess with ``--xla_force_host_platform_device_count=8`` (tests/train_worker.py ``layouts``) trains the toy
method for 3 steps on a single device and on three layouts of all 8 (pure data, fsdp, fsdp x tensor), compares
gradient accumulation on data 2 x fsdp 4 with one device's big-batch step, then restores
the fsdp run's checkpoint onto a 4-device (fsdp 2 x tensor 2) mesh and onto one device.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_worker(args, devices=8, timeout=400):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_worker.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts")
    run_worker(["layouts", str(folder / "out.npz"), str(folder / "runs")])
    return dict(np.load(folder / "out.npz"))


def params_of(results, name):
    prefix = f"{name}/param/"
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("layout", ["data", "fsdp", "fsdp_tensor"])
def test_sharded_step_matches_single_device(layouts, layout):
    ref_loss, loss = layouts["single/loss"], layouts[f"{layout}/loss"]
    assert len(loss) == 3
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    ref, got = params_of(layouts, "single"), params_of(layouts, layout)
    assert ref.keys() == got.keys() and len(ref) > 10
    errors = {k: relative_error(got[k], ref[k]) for k in ref}
    assert max(errors.values()) < 1e-5, errors
    if layout != "data":
        # the layout really shards parameters and Adam moments (not all replicated)
        assert int(layouts[f"{layout}/sharded_leaves"]) >= 8
        assert int(layouts[f"{layout}/opt_sharded_leaves"]) >= 8
    else:
        assert int(layouts["data/sharded_leaves"]) == 0


def test_sharded_gradient_accumulation_matches_one_device_big_batch(layouts):
    np.testing.assert_allclose(layouts["fsdp_accum/loss"], layouts["single_big/loss"], rtol=1e-5)
    ref, got = params_of(layouts, "single_big"), params_of(layouts, "fsdp_accum")
    errors = {k: relative_error(got[k], ref[k]) for k in ref}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("target", ["restore4", "restore1"])
def test_checkpoint_from_8_devices_restores_onto_fewer(layouts, target):
    saved, restored = params_of(layouts, "fsdp"), params_of(layouts, target)
    assert saved.keys() == restored.keys()
    for key in saved:
        np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
    assert int(layouts[f"{target}/data_next_batch"]) == 3
