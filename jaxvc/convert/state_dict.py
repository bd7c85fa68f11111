"""Reading PyTorch-format weight files from local disk into ``{key: numpy array}`` state dicts.

Supported: a ``.safetensors`` file; a folder with ``<name>.safetensors`` or a sharded ``<name>.safetensors.index.json``
(e.g. Wan-14B), optionally a variant such as ``fp16`` (``diffusion_pytorch_model.fp16.safetensors``); pickled
``.ckpt``/``.bin``/``.pt``/``.pth`` files only with ``allow_pickle=True``, read by a restricted unpickler that builds
tensors from their storages without importing torch or running arbitrary code.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class WeightFileError(ValueError):
    """A weight file is missing, unreadable or of an unexpected kind; the message names the file."""


def _as_numpy(tensor_dict):
    return {k: np.asarray(v) for k, v in tensor_dict.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return _as_numpy(load_file(str(path)))
    except TypeError:
        pass  # bfloat16 has no numpy dtype: read through ml_dtypes below
    except Exception as error:  # safetensors raises its own error types
        raise WeightFileError(f"{path}: not a readable safetensors file ({error})") from error
    return _read_safetensors_raw(Path(path))


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors parser for dtypes numpy lacks (BF16, F8): header JSON + raw little-endian buffers."""
    import ml_dtypes
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise WeightFileError(f"{path}: tensor '{key}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[key] = np.frombuffer(raw[base + start:base + end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint into numpy arrays, allowing only tensor-rebuild globals."""

    _STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                       "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                       "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
                       "BFloat16Storage": "bfloat16"}

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, backward_hooks, *rest: data
        if module == "torch" and name in self._STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"{self.source}: refusing to unpickle global {module}.{name} "
                                     "(only tensors and dicts are allowed)")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        _, storage_type, key, _, _ = pid
        dtype = self._STORAGE_DTYPES[storage_type if isinstance(storage_type, str) else storage_type]
        data = self.archive.read(f"{self.prefix}/data/{key}")
        if dtype == "bfloat16":
            import ml_dtypes
            dtype = ml_dtypes.bfloat16
        return np.frombuffer(data, dtype=dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[storage_offset].copy().reshape(())
    return np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


def read_pickle_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    path = Path(path)
    if not allow_pickle:
        raise WeightFileError(f"{path}: pickled checkpoints can run code when loaded; pass allow_pickle=True "
                              "(--allow-pickle) if you trust this file, or convert it to safetensors")
    if not zipfile.is_zipfile(path):
        raise WeightFileError(f"{path}: not a zip-format torch checkpoint (legacy pre-1.6 pickles are not supported)")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise WeightFileError(f"{path}: zip archive without data.pkl; not a torch checkpoint")
        prefix = pkl[0][:-len("/data.pkl")]
        with archive.open(pkl[0]) as handle:
            obj = _RestrictedUnpickler(handle, archive, prefix, str(path)).load()
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightFileError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def read_weight_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: weight file does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle_checkpoint(path, allow_pickle)
    raise WeightFileError(f"{path}: unknown weight file type '{path.suffix}' "
                          f"(expected .safetensors or, with allow_pickle, one of {PICKLE_SUFFIXES})")


def read_model_config(folder: str | os.PathLike, needed_by: str) -> dict:
    """The ``config.json`` of a diffusers/transformers model folder; ``needed_by`` says whose folder, for the
    error (e.g. "a diffusers VAE folder")."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightFileError(f"{path}: missing; {needed_by} needs config.json next to its weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightFileError(f"{path}: not valid JSON ({error})") from error


def read_model_folder(folder: str | os.PathLike, weights_name: str, variant: str | None = None,
                      allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The state dict of a diffusers/transformers model folder.

    ``weights_name`` is the stem (``diffusion_pytorch_model`` or ``model``). Looks for, in order:
    ``<stem>[.<variant>].safetensors``, its sharded index ``<stem>[.<variant>].safetensors.index.json``, and with
    ``allow_pickle`` the ``.bin`` equivalents (``<stem>.bin``, or
    transformers' ``pytorch_<stem>.bin``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightFileError(f"{folder}: model folder does not exist")
    stem = weights_name if variant is None else f"{weights_name}.{variant}"
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise WeightFileError(f"{index}: keys listed in the index are missing from the shards: {missing[:10]}")
        return state
    for pickled in (folder / f"{stem}.bin", folder / f"pytorch_{stem}.bin"):  # diffusers' and transformers' names
        if pickled.is_file():
            return read_pickle_checkpoint(pickled, allow_pickle)
    found = sorted(p.name for p in folder.iterdir())
    raise WeightFileError(f"{folder}: no '{stem}.safetensors' or '{stem}.safetensors.index.json' "
                          f"(found {found})")
