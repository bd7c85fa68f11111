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
