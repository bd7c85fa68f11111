"""Orbax storage of converted weights: a jaxvc model checkpoint that loads fast, onto any device layout.

Layout of a converted pipeline directory::

    <out>/jaxvc_pipeline.json   format version, model configs (unet, vae, text encoder), scheduler config
    <out>/params/               Orbax PyTree checkpoint {"unet": ..., "vae": ..., "text_encoder": ...}
    <out>/tokenizer/            the tokenizer files, copied

Orbax finalizes a save by renaming a temporary directory, so an interrupted conversion never leaves a directory
that looks complete; the JSON is written to a temporary file and renamed after the parameters are in place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
INDEX_NAME = "jaxvc_pipeline.json"


def save_param_tree(directory: str | os.PathLike, tree: Any) -> None:
    """Write a pytree of arrays as an Orbax checkpoint at ``directory`` (which must not exist yet)."""
    directory = Path(directory).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, jax.tree.map(np.asarray, tree))
    checkpointer.wait_until_finished()


def restore_param_tree(directory: str | os.PathLike, abstract_tree: Any | None = None) -> Any:
    """Read a tree written by ``save_param_tree``.

    ``abstract_tree``: a tree of ``jax.ShapeDtypeStruct`` (optionally with ``sharding``) to restore directly into
    those shardings and dtypes; ``None`` restores host numpy arrays.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no Orbax parameter checkpoint here")
    checkpointer = ocp.StandardCheckpointer()
    if abstract_tree is None:
        metadata = checkpointer.metadata(directory)
        tree_meta = getattr(metadata, "item_metadata", metadata)
        abstract_tree = jax.tree.map(
            lambda m: np.zeros(m.shape, m.dtype), tree_meta.tree if hasattr(tree_meta, "tree") else tree_meta)
    return checkpointer.restore(directory, abstract_tree)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """A safetensors file of host ``tensors`` written beside ``path``, then renamed over it: a reader never sees a
    half-written file (an interrupted export leaves the previous one or none)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "dtype") and hasattr(value, "name"):
        return str(value)
    return str(value)
