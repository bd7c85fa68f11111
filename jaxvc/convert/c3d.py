"""Load the UCF-101 C3D of the video Inception Score: its weights and its training mean clip.

Weights: ``conv3d_deepnetA_ucf.npz`` (TGANv2's chainer file, keys ``conv1a/W`` (out, in, kt, kh, kw), ``conv1a/b``,
..., ``fc6/W`` (out, in), ``fc8/b``), the same keys torch-style (``conv1a.weight``/``.bias``) in a ``.safetensors``
file, or a torch state dict (``.pt``/``.pth`` with ``allow_pickle``). ``.npz`` files are read with numpy's pickle
switched off. A prefix before the link names (``predictor/``, ``module.``) is dropped.

Mean: ``mean2.npz`` (TGANv2; key ``mean``, 3 x 16 x 128 x 171 values: the Sports-1M training clips' mean of Caffe's
C3D, BGR, channels first) or a ``.npy`` of those values. TGANv2 keeps its centre 128 columns (21..148), the part
that lines up with frames resized to 128 x 128.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from jaxvc.convert.state_dict import WeightFileError, read_weight_file
from jaxvc.convert.torch_to_flax import fill_params, rename_keys
from jaxvc.models.c3d import CLIP_FRAMES, NUM_CLASSES, abstract_c3d_params

MEAN_SHAPE = (3, CLIP_FRAMES, 128, 171)  # (BGR, frames, rows, columns) of mean2.npz
MEAN_COLUMNS = slice(21, 21 + 128)  # TGANv2: mean.reshape(3, 1, 16, 128, 171)[..., 21:21 + 128]

_LINKS = r"(conv\d[ab]|fc\d)"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (no pickled objects), as numpy arrays; WeightFileError if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise WeightFileError(f"{path}: not a readable .npz file ({error})") from error


def c3d_params_from_state_dict(state_dict, source: str = "C3D checkpoint", num_classes: int = NUM_CLASSES) -> dict:
    """``{"params": ...}`` for ``C3D(num_classes)`` from chainer (``conv1a/W``) or torch (``conv1a.weight``) keys;
    ``CheckpointMismatchError`` names ``source`` and every missing/unexpected key or wrong shape."""
    state = rename_keys(state_dict, ((rf"^.*?\b{_LINKS}/W$", r"\1.weight"), (rf"^.*?\b{_LINKS}/b$", r"\1.bias"),
                                     (rf"^.*[./]{_LINKS}\.(weight|bias)$", r"\1.\2")))
    return {"params": fill_params(abstract_c3d_params(num_classes), state, source=source)}


def load_c3d(path: str | os.PathLike, allow_pickle: bool = False, num_classes: int = NUM_CLASSES) -> tuple[None, dict]:
    """``(None, {"params": ...})`` for ``C3D(num_classes)`` from ``.npz`` (chainer), ``.safetensors`` or, with
    ``allow_pickle``, ``.pt``/``.pth``. The model has no config beyond ``num_classes`` (101 for UCF-101)."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise WeightFileError(f"{path}: weight file does not exist")
        state_dict = read_npz(path)
    else:
        state_dict = read_weight_file(path, allow_pickle=allow_pickle)
    return None, c3d_params_from_state_dict(state_dict, source=str(path), num_classes=num_classes)


def load_c3d_mean(path: str | os.PathLike) -> np.ndarray:
    """The mean clip TGANv2 subtracts, cropped as it does: (16, 128, 128, 3) float32, BGR, channels last."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: C3D mean file does not exist")
    if path.suffix == ".npz":
        arrays = read_npz(path)
        if "mean" not in arrays:
            raise WeightFileError(f"{path}: no 'mean' array (TGANv2's mean2.npz has one); found {sorted(arrays)}")
        mean = arrays["mean"]
    elif path.suffix == ".npy":
        try:
            mean = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise WeightFileError(f"{path}: not a readable .npy file ({error})") from error
    else:
        raise WeightFileError(f"{path}: unknown mean file type '{path.suffix}' (expected TGANv2's mean2.npz or .npy)")
    if mean.size != int(np.prod(MEAN_SHAPE)) or not np.issubdtype(mean.dtype, np.number):
        raise WeightFileError(f"{path}: the mean has shape {mean.shape} ({mean.dtype}); expected "
                              f"{int(np.prod(MEAN_SHAPE))} numbers, (1,) {MEAN_SHAPE} as in TGANv2's mean2.npz")
    mean = mean.astype(np.float32).reshape(MEAN_SHAPE)[..., MEAN_COLUMNS]  # (3, 16, 128, 128)
    return np.ascontiguousarray(np.transpose(mean, (1, 2, 3, 0)))  # (16, 128, 128, 3)
