"""Load I3D weights (TATS's ``i3d_pretrained_400.pt``, the state dict of piergiaj's ``InceptionI3d``) for FVD/KVD.

The file is a bare torch state dict (zip-format pickle, read without torch by ``jaxvc.convert.state_dict``; pass
``allow_pickle=True`` for ``.pt``/``.pth``) or the same keys in a ``.safetensors`` file. Keys map onto
``jaxvc.models.i3d.InceptionI3d`` mechanically (``Mixed_3b.b1a.conv3d.weight`` -> ``Mixed_3b/b1a/conv3d/kernel``,
``...bn.weight`` -> ``.../bn/scale``, ``running_mean``/``running_var`` unchanged); ``num_batches_tracked`` is
ignored and a ``module.`` prefix (a ``DataParallel`` save) is stripped.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from jaxvc.convert.state_dict import read_weight_file
from jaxvc.convert.torch_to_flax import fill_params, rename_keys
from jaxvc.models.i3d import abstract_i3d_params

I3D_IGNORED = (r"(^|\.)num_batches_tracked$",)


def i3d_params_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "I3D checkpoint",
                               num_classes: int = 400, epsilon: float = 1e-5) -> dict:
    """``{"params": ...}`` for ``InceptionI3d(num_classes, epsilon)`` from piergiaj-named torch keys; raises
    ``CheckpointMismatchError`` naming ``source`` and every missing/unexpected key or wrong shape."""
    state = rename_keys(state_dict, ((r"^module\.", ""),))
    params = fill_params(abstract_i3d_params(num_classes, epsilon), state, source=source, ignore=I3D_IGNORED)
    return {"params": params}


def load_i3d(path: str | os.PathLike, allow_pickle: bool = False, num_classes: int = 400) -> tuple[None, dict]:
    """``(None, {"params": ...})`` for ``InceptionI3d(num_classes)`` from a ``.pt``/``.pth`` (with
    ``allow_pickle``) or ``.safetensors`` file. The model has no config beyond ``num_classes`` (400 for Kinetics-400,
    which FVD uses), hence ``None`` in the config slot. Raises ``WeightFileError`` for an unreadable file and
    ``CheckpointMismatchError`` (naming the file and the keys) for weights of another network."""
    state_dict = read_weight_file(path, allow_pickle=allow_pickle)
    return None, i3d_params_from_state_dict(state_dict, source=str(path), num_classes=num_classes)
