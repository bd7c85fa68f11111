"""Test-wide settings: offline hubs, one torch thread (faster at tiny sizes), full fp32 matmuls."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
