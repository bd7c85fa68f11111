"""A whole text-to-video pipeline from local files: a diffusers folder or a jaxvc (Orbax) checkpoint.

A diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) plus an optional motion adapter (a diffusers ``MotionAdapter`` folder or an original AnimateDiff
motion-module file) loads into ``PipelineWeights``. ``save_converted`` writes it as a jaxvc checkpoint
(``jaxvc/convert/orbax_io.py`` layout) and ``load_pipeline`` reads either kind.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxvc.convert.clip import load_clip_text
from jaxvc.convert.orbax_io import (FORMAT_VERSION, INDEX_NAME, restore_param_tree, save_param_tree,
                                    write_json_atomic)
from jaxvc.convert.unet import load_unet
from jaxvc.convert.vae import load_vae
from jaxvc.models.clip_text import CLIPTextConfig
from jaxvc.models.motion import BUFFERS
from jaxvc.models.unet import MotionConfig, UNetConfig
from jaxvc.models.vae import VAEConfig

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_DTYPE_FIELDS = ("dtype", "param_dtype")
UNET_BUFFERS = "unet_buffers"  # the params tree's entry for the UNet's stored positional tables, when it has any


class PipelineFolderError(ValueError):
    """A pipeline folder or checkpoint is missing a part; the message names the path."""


@dataclasses.dataclass
class PipelineWeights:
    unet_config: UNetConfig
    unet_params: Any              # {"params": ...}
    vae_config: VAEConfig | None  # None: pixel-space model
    vae_params: Any | None
    text_config: CLIPTextConfig
    text_params: Any
    tokenizer_folder: Path | None  # None: jaxvc's default CLIP tokenizer (derived from open_clip's BPE file)
    scheduler_config: dict


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise PipelineFolderError(f"{path}: missing {what}")
    return path


def load_diffusers_pipeline(folder: str | Path, *, motion_adapter: str | Path | None = None,
                            variant: str | None = None, allow_pickle: bool = False,
                            **unet_overrides) -> PipelineWeights:
    """Read a diffusers Stable Diffusion / AnimateDiff pipeline folder.

    If ``unet/`` is a ``UNetMotionModel`` (an AnimateDiff pipeline saved whole) its motion modules load with it;
    otherwise ``motion_adapter`` supplies them. ``unet_overrides``: UNetConfig fields such as ``dtype``.
    """
    folder = Path(folder)
    _require(folder / "model_index.json", "model_index.json (not a diffusers pipeline folder)")
    unet_config, unet_params = load_unet(_require(folder / "unet", "unet/"), motion_adapter, variant=variant,
                                         allow_pickle=allow_pickle, **unet_overrides)
    vae_config, vae_params = load_vae(_require(folder / "vae", "vae/"), variant=variant, allow_pickle=allow_pickle)
    text_config, text_params = load_clip_text(_require(folder / "text_encoder", "text_encoder/"), variant=variant,
                                              allow_pickle=allow_pickle)
    tokenizer = _require(folder / "tokenizer", "tokenizer/")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    return PipelineWeights(unet_config, unet_params, vae_config, vae_params, text_config, text_params, tokenizer,
                           scheduler)


# ------------------------------------------------------------------------------------------- jaxvc checkpoints
def _config_to_json(config) -> dict | None:
    if config is None:
        return None
    values = dataclasses.asdict(config)
    for name in _DTYPE_FIELDS:
        if name in values:
            values[name] = jnp.dtype(values[name]).name
    return values


def _config_from_json(cls, values: dict | None, **overrides):
    if values is None:
        return None
    values = dict(values)
    for name in _DTYPE_FIELDS:
        if name in values:
            values[name] = jnp.dtype(values[name])
    if cls is UNetConfig and values.get("motion") is not None:
        values["motion"] = MotionConfig(**values["motion"])
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return cls(**{**values, **overrides})


def save_converted(weights: PipelineWeights, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``weights`` as a jaxvc checkpoint directory (see ``jaxvc/convert/orbax_io.py``)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tree = {"unet": weights.unet_params["params"], "text_encoder": weights.text_params["params"]}
    if weights.vae_params is not None:
        tree["vae"] = weights.vae_params["params"]
    if BUFFERS in weights.unet_params:  # stored motion positional tables that differ from the formula: kept
        tree[UNET_BUFFERS] = weights.unet_params[BUFFERS]
    save_param_tree(out_dir / "params", tree)
    if weights.tokenizer_folder is not None:
        (out_dir / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (Path(weights.tokenizer_folder) / name).is_file():
                shutil.copy2(Path(weights.tokenizer_folder) / name, out_dir / "tokenizer" / name)
    write_json_atomic(out_dir / INDEX_NAME, {
        "format_version": FORMAT_VERSION,
        "unet": _config_to_json(weights.unet_config),
        "vae": _config_to_json(weights.vae_config),
        "text_encoder": _config_to_json(weights.text_config),
        "scheduler": weights.scheduler_config,
        "has_tokenizer": weights.tokenizer_folder is not None,
    })
    return out_dir


def load_converted(folder: str | Path, **unet_overrides) -> PipelineWeights:
    folder = Path(folder)
    index = json.loads(_require(folder / INDEX_NAME, INDEX_NAME).read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise PipelineFolderError(f"{folder / INDEX_NAME}: format_version {index.get('format_version')} is not "
                                  f"{FORMAT_VERSION} (written by another jaxvc version)")
    tree = restore_param_tree(folder / "params")
    as_params = lambda name: {"params": tree[name]} if name in tree else None
    unet = as_params("unet")
    if UNET_BUFFERS in tree:
        unet[BUFFERS] = tree[UNET_BUFFERS]
    return PipelineWeights(
        _config_from_json(UNetConfig, index["unet"], **unet_overrides), unet,
        _config_from_json(VAEConfig, index["vae"]), as_params("vae"),
        _config_from_json(CLIPTextConfig, index["text_encoder"]), as_params("text_encoder"),
        folder / "tokenizer" if index.get("has_tokenizer") else None, index.get("scheduler", {}))


def load_pipeline(path: str | Path, **kwargs) -> PipelineWeights:
    """A jaxvc checkpoint (has ``jaxvc_pipeline.json``) or a diffusers pipeline folder (has ``model_index.json``)."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        return load_converted(path, **{k: v for k, v in kwargs.items()
                                       if k not in ("motion_adapter", "variant", "allow_pickle")})
    if (path / "model_index.json").is_file():
        return load_diffusers_pipeline(path, **kwargs)
    raise PipelineFolderError(f"{path}: neither a jaxvc checkpoint ({INDEX_NAME}) nor a diffusers pipeline folder "
                              "(model_index.json)")


def tree_equal(a, b) -> bool:
    """Exact equality of two parameter trees (structure, shapes, values)."""
    import jax
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))
