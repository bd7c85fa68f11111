"""Load AMT's released checkpoints into ``jaxvc.models.amt.AMT``: ``amt-s.pth`` (MCG-NKU/AMT, the file VBench's
motion smoothness downloads to ``~/.cache/vbench/amt_model/``; a torch pickle ``{"state_dict": ...}``) or a
``.safetensors`` copy of the state dict.

Only AMT-S is supported (the size VBench uses); AMT-L/G (a larger feature encoder and update blocks) are named as
such. PReLU slopes (``...weight`` of shape (C,): AMT-S has no other 1-D weights, its norms carry no parameters) load
as ``negative_slope``; a ``module.`` prefix (a ``DataParallel`` save) is dropped.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.convert.state_dict import read_weight_file
from jaxvc.convert.torch_to_flax import CheckpointMismatchError, fill_params, rename_keys
from jaxvc.models.amt import AMT, VARIANTS, AMTConfig


def abstract_amt_params(config: AMTConfig) -> dict:
    frames = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
    return jax.eval_shape(lambda x: AMT(config).init(jax.random.key(0), x, x), frames)["params"]


def amt_params_from_state_dict(state_dict, source: str = "AMT checkpoint") -> tuple[AMTConfig, dict]:
    """(config, ``{"params": ...}``) from an AMT-S state dict."""
    state = rename_keys(state_dict, ((r"^module\.", ""),))
    stem = state.get("feat_encoder.conv1.weight")
    if stem is None:
        raise CheckpointMismatchError(f"{source}: no 'feat_encoder.conv1.weight'; this is not an AMT checkpoint "
                                      f"(first keys: {sorted(state)[:5]})")
    config = VARIANTS["small"]
    if tuple(stem.shape) != (32, 3, 7, 7) or "update4.convc2.weight" in state:
        extra = " with a convc2 in the update blocks" if "update4.convc2.weight" in state else ""
        raise CheckpointMismatchError(f"{source}: 'feat_encoder.conv1.weight' is {tuple(stem.shape)}{extra}"
                                      ": this is AMT-L or AMT-G; jaxvc implements AMT-S (stem (32, 3, 7, 7)), the "
                                      "model VBench's motion smoothness uses")
    state = {(key[:-len("weight")] + "negative_slope" if key.endswith(".weight") and np.ndim(value) == 1 else key):
             value for key, value in state.items()}
    return config, {"params": fill_params(abstract_amt_params(config), state, source=source)}


def load_amt(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[AMTConfig, dict]:
    """(config, ``{"params": ...}``) from ``amt-s.pth`` (a torch pickle: needs ``allow_pickle``) or a
    ``.safetensors`` file. Raises ``CheckpointMismatchError`` naming missing/unexpected keys and shapes."""
    state_dict = read_weight_file(path, allow_pickle=allow_pickle)
    config, params = amt_params_from_state_dict(state_dict, source=str(path))
    return config, jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)


__all__ = ["load_amt", "amt_params_from_state_dict", "abstract_amt_params"]
