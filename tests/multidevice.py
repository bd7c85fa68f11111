"""Run a check script in a fresh Python with N simulated CPU devices (the device count must be fixed before JAX
initialises, and the pytest process may already run JAX with one device)."""
import os
import subprocess
import sys
from pathlib import Path


def run_with_devices(script: str, devices: int = 8, marker: str = "SHARDED_OK", timeout: int = 600) -> str:
    """Runs ``script`` with ``devices`` forced host devices; asserts it exits 0 and prints ``marker``."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert marker in result.stdout
    return result.stdout


SHARDED_TRAIN_STEP = """
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jaxvc.config_utils import apply_overrides, load_config
from jaxvc.methods import build_method
from jaxvc.parallel.mesh import make_mesh
from jaxvc.train import distributed
from jaxvc.train.cli import build_data
from jaxvc.train.loop import Trainer

config = load_config(CONFIG)
apply_overrides(config, [("batch_size", "8"), ("progress_bar", "False"),
                         ("compiler_options", "{'xla_backend_optimization_level': 0, "
                                              "'xla_llvm_disable_expensive_passes': True}")])
data = build_data(config, (0, 8))
batches = [next(data) for _ in range(2)]
results = {}
for name, sizes in (("single", {"data": 1}), ("sharded", {"data": 2, "fsdp": 4})):
    mesh = make_mesh(sizes, devices=jax.devices()[:1] if name == "single" else None)
    trainer = Trainer(config, build_method(config), f"/tmp/unused-{name}", mesh=mesh)
    state = trainer.init_state()
    losses = []
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if k in KEYS}
        state, metrics = trainer.step(state, distributed.global_batch(arrays, mesh, 8, trainer.rules))
        losses.append(float(metrics["loss"]))
    results[name] = (losses, jax.tree.map(np.asarray, jax.device_get(state.params)))
(l1, p1), (l8, p8) = results["single"], results["sharded"]
print("losses", l1, l8)
np.testing.assert_allclose(l8, l1, rtol=1e-5)
for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
print("SHARDED_OK")
"""


def sharded_train_step_script(config: str, keys=("video", "tokens")) -> str:
    """A script for ``run_with_devices``: two train steps of the method of ``config`` (batch 8) on one device and on
    a data 2 x fsdp 4 mesh of 8 simulated devices give the same losses and parameters."""
    return f"CONFIG = {config!r}\nKEYS = {tuple(keys)!r}\n" + SHARDED_TRAIN_STEP
