"""Test-wide settings: offline hubs, one torch thread (faster at tiny sizes), full fp32 matmuls, and XLA:CPU's cheap
code generation (LLVM -O0 without its expensive passes): the suite's time is mostly compiling tiny programs, and in
a measurement of three of the slowest tests (training + sampling) this took 15-22% off each. Subprocesses inherit
it; the multi-device scripts set their own flags. JAXVC_TEST_FULL_OPT=1 keeps XLA's defaults."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("JAXVC_TEST_FULL_OPT", "0") != "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

# One XLA compilation cache for the whole run: its pytest workers and the subprocesses they start (multi-device
# scripts, CLI runs) share it through JAX's environment variables, so a program compiled by one test (a method's
# init, train step or sampler at its tiny size) is loaded, not compiled again, by the next. New and empty for every
# run (nothing carries over between runs; the process that made it removes it at the end). Size-limited so that JAX
# takes a file lock around each entry (two workers write it). JAXVC_TEST_COMPILE_CACHE=0 compiles everything.
# Measured (session 24, this 2-core VM, `-n 2 --dist loadfile`): 35 min 54 s instead of 38 min 11 s for the suite,
# the workers' XLA compile time 1625 s instead of 1764 s (most programs repeated by signature differ in their HLO).
if os.environ.get("JAXVC_TEST_COMPILE_CACHE", "1") == "1" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvc-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    _CACHE_OWNER = os.getpid()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
except ImportError:
    pass


def relative_error(ours, reference) -> float:
    """||ours - reference|| / ||reference|| in float64 (the parity bound in the issues is < 1e-5)."""
    import numpy as np

    ours = np.asarray(ours, np.float64)
    reference = np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def random_unet_variables(config, seed=0) -> dict:
    """{"params": random weights} for a jaxvc UNet config without torch and without running init (the abstract tree
    filled from numpy: fast even for many levels)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from jaxvc.convert.unet import abstract_variables

    rng = np.random.default_rng(seed)
    tree = nn.unbox(abstract_variables(config)["params"])
    return {"params": jax.tree.map(lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32),
                                   tree)}


def softmax_attention(query, key, value, causal=False, xp=None):
    """The attention formula: softmax(q k^T / sqrt(d)) v, (B, L, H, D) layout, a causal mask aligned bottom-right.
    ``xp`` numpy (default; computes in float64) or ``jax.numpy`` (differentiable: its inputs' dtype, e.g. float64
    under ``jax.enable_x64``)."""
    import numpy as np

    if xp is None:
        xp = np
        query, key, value = (np.asarray(t, np.float64) for t in (query, key, value))
    logits = xp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    if causal:
        lq, lk = query.shape[1], key.shape[1]
        logits = xp.where(xp.tril(xp.ones((lq, lk), bool), k=lk - lq), logits, -xp.inf)
    weights = xp.exp(logits - logits.max(-1, keepdims=True))
    return xp.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), value)


def has_cuda_plugin() -> bool:
    """Installed in this venv, or in .venv/opt/jax-cuda by `launch/setup_env.sh --gpu-compile`."""
    import importlib.util
    import os
    import sys

    from jaxvc.bench.gpu_targets import PLUGIN_FOLDER

    if os.path.isdir(os.path.join(sys.prefix, PLUGIN_FOLDER)):
        return True
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{version}") for version in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


# The suite runs as `pytest -n 2 --dist loadfile`: each file goes whole to whichever worker is free, in the order
# given. Files in alphabetical order left one worker on a long file for minutes after the other had finished, so
# the longest files (seconds of one worker on the 2-core CI machine, `--durations` of session 23) are handed out
# first and the many short ones fill in behind them (longest-processing-time-first scheduling).
LONGEST_FILES = ("test_microcinema.py", "test_customcrafter.py", "test_still_moving.py", "test_plan.py",
                 "test_validation_samples.py", "test_notebooks.py", "test_c3d_inception_score.py",
                 "test_context_parallel.py", "test_disentangled_s2v.py", "test_videomaker.py",
                 "test_wan_i2v_pipeline.py", "test_trained_run.py", "test_sharded_sampling.py",
                 "test_amt_motion_smoothness.py", "test_demo.py", "test_unet_parity.py", "test_i3d_fvd.py", "test_unet_options.py", "test_sweep.py",
                 "test_generate.py", "test_bench.py")


def pytest_unconfigure(config):
    if globals().get("_CACHE_OWNER") == os.getpid():
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # xdist's default orders files by their number of tests
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
