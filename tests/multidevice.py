"""Run a check script in a fresh Python with N simulated CPU devices (the device count must be fixed before JAX
initialises, and the pytest process may already run JAX with one device)."""
import os
import subprocess
import sys
from pathlib import Path


def run_with_devices(script: str, devices: int = 8, marker: str = "SHARDED_OK", timeout: int = 600) -> str:
    """Runs ``script`` with ``devices`` forced host devices; asserts it exits 0 and prints ``marker``."""
    root = Path(__file__).resolve().parents[1]
    # the test process's XLA flags (conftest's cheap code generation) are kept: a program the scripts share (a
    # component's init) then compiles as the others do, and the run's compilation cache serves it to the next
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert marker in result.stdout
    return result.stdout



SHARDED_LOSS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
jax.config.update("jax_default_matmul_precision", "highest")
from jaxvc.methods import build_method
from jaxvc.parallel.mesh import activate, make_mesh
from jaxvc.parallel.rules import param_shardings
from tests.tiny_models import method_config

method = build_method(method_config(CONFIG))
fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
params = method.init_params(jax.random.key(0))  # eager: each component its own (cached) program
for name in PERTURB:  # zero-initialised parts made non-zero, so that what lies behind them gets gradients too
    params["params"][name] = jax.tree.map(lambda v: 0.05 * jax.random.normal(jax.random.key(v.size), v.shape),
                                          params["params"][name])
rng = np.random.default_rng(0)
batch = {key: np.tile(np.asarray(method.empty_prompt_tokens), (8, 1)) if key == "tokens"
         else rng.uniform(-1, 1, spec.shape).astype(np.float32) for key, spec in method.example_batch(8).items()}
loss_and_grad = lambda p, b: jax.value_and_grad(lambda q: method.loss(q, b, jax.random.key(1))[0])(p)
single = jax.jit(loss_and_grad).lower(params, batch).compile(fast)(params, batch)
mesh = make_mesh({"data": 2, "fsdp": 4})
with activate(mesh):
    shardings = param_shardings(method.abstract_params(), mesh)
    for name in SHARDED_PARTS:
        assert any(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings["params"][name])), name
    sharded_params = jax.device_put(params, shardings)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    sharded = jax.jit(loss_and_grad).lower(sharded_params, sharded_batch).compile(fast)(sharded_params, sharded_batch)
print("loss", float(single[0]), float(sharded[0]))
np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-5)
for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
print("SHARDED_OK")
"""


def sharded_loss_script(config: str, *, perturb=(), sharded_parts=()) -> str:
    """A script for ``run_with_devices``: the loss of the method of ``config`` and its gradients on a batch of 8,
    on one device and on a data 2 x fsdp 4 mesh of 8 simulated devices (parameters sharded by the rule table),
    are the same. ``perturb``: parameter groups drawn at random first; ``sharded_parts``: groups that must have a
    sharded leaf."""
    return (f"CONFIG = {config!r}\nPERTURB = {tuple(perturb)!r}\nSHARDED_PARTS = {tuple(sharded_parts)!r}\n"
            + SHARDED_LOSS)
