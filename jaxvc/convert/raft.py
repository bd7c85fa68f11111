"""Load RAFT's released checkpoints (princeton-vl/RAFT ``models/raft-things.pth``, ``raft-small.pth``, ...) into
``jaxvc.models.raft.RAFT``.

The files are ``DataParallel`` state dicts (keys ``module.fnet.conv1.weight``); a ``.safetensors`` copy with or
without the prefix loads too. The size (large or small) is read from the keys. In the torch blocks the shortcut's
norm is registered twice (as ``norm3``/``norm4`` and as ``downsample.1``); jaxvc keeps the ``downsample.1`` copy.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvc.convert.state_dict import read_weight_file
from jaxvc.convert.torch_to_flax import CheckpointMismatchError, fill_params, rename_keys
from jaxvc.models.raft import RAFT, VARIANTS, RAFTConfig

IGNORED = (r"\.num_batches_tracked$",)
# the shortcut norm's second name: norm3 in the large model's residual blocks, norm4 in the small bottlenecks
SHORTCUT_NORM_ALIAS = {False: r"^[fc]net\.layer\d\.\d\.norm3\.", True: r"^[fc]net\.layer\d\.\d\.norm4\."}


def abstract_raft_params(config: RAFTConfig) -> dict:
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(lambda x: RAFT(config).init(jax.random.key(0), x, x, iters=1), images)["params"]


def raft_params_from_state_dict(state_dict, source: str = "RAFT checkpoint",
                                iters: int = 20) -> tuple[RAFTConfig, dict]:
    """(config, ``{"params": ...}``) from a RAFT state dict (with or without ``module.``)."""
    state = rename_keys(state_dict, ((r"^module\.", ""),))
    stem = state.get("fnet.conv1.weight")
    if stem is None:
        raise CheckpointMismatchError(f"{source}: no 'fnet.conv1.weight' (or 'module.fnet.conv1.weight'); this is "
                                      f"not a RAFT checkpoint (first keys: {sorted(state)[:5]})")
    small = {64: False, 32: True}.get(int(stem.shape[0]))
    if small is None:
        raise CheckpointMismatchError(f"{source}: 'fnet.conv1.weight' has {stem.shape[0]} output channels; RAFT's "
                                      "large model has 64, the small one 32")
    config = RAFTConfig(small=small, iters=iters)
    params = fill_params(abstract_raft_params(config), state, source=source,
                         ignore=IGNORED + (SHORTCUT_NORM_ALIAS[small],))
    return config, {"params": params}


def load_raft(path: str | os.PathLike, *, allow_pickle: bool = False, iters: int = 20) -> tuple[RAFTConfig, dict]:
    """(config, ``{"params": ...}``) from a RAFT ``.pth`` (a torch pickle: needs ``allow_pickle``) or
    ``.safetensors`` file. Raises ``CheckpointMismatchError`` naming missing/unexpected keys and shapes."""
    state_dict = read_weight_file(path, allow_pickle=allow_pickle)
    config, params = raft_params_from_state_dict(state_dict, source=str(path), iters=iters)
    return config, jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)


__all__ = ["load_raft", "raft_params_from_state_dict", "abstract_raft_params", "VARIANTS"]
