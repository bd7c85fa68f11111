"""Load a transformers ``text_encoder/`` folder (config.json + safetensors) into jaxvc's ``CLIPTextEncoder``.

transformers 5 saves ``CLIPTextModel`` keys without a prefix; SD 1.5's ``text_encoder/model.safetensors`` has the
``text_model.`` prefix and the ``text_model.embeddings.position_ids`` buffer. Both load: the prefix is stripped and
``position_ids`` is dropped (positions are ``arange(L)``). A full ``CLIPModel`` folder also loads: its vision tower,
projections and ``logit_scale`` are skipped.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from jaxvc.convert.state_dict import read_model_config, read_model_folder
from jaxvc.convert.torch_to_flax import fill_params, rename_keys
from jaxvc.models.clip_text import CLIPTextConfig, abstract_clip_text_params

WEIGHTS_NAME = "model"
TEXT_PREFIX_RENAME = ((r"^text_model\.", ""),)
# Buffers recomputed here, and the parts of a full CLIPModel that are not the text tower.
IGNORED_KEYS = (r"(^|\.)embeddings\.position_ids$", r"^vision_model\.", r"^visual_projection\.",
                r"^text_projection\.", r"^logit_scale$")


def read_config(folder: str | os.PathLike) -> dict:
    return read_model_config(folder, "a transformers model folder")


def clip_text_params_from_state_dict(config: CLIPTextConfig, state_dict: Mapping[str, np.ndarray],
                                     source: str = "CLIP text checkpoint") -> dict:
    """``{"params": ...}`` for ``CLIPTextEncoder(config)`` from a transformers-named torch state dict."""
    state_dict = rename_keys(state_dict, TEXT_PREFIX_RENAME)
    params = fill_params(abstract_clip_text_params(config)["params"], state_dict, source=source,
                         ignore=IGNORED_KEYS, dtype=np.dtype(config.param_dtype))
    return {"params": params}


def load_clip_text(folder: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
                   **config_overrides) -> tuple[CLIPTextConfig, dict]:
    """``(CLIPTextConfig, {"params": ...})`` from a transformers ``text_encoder/`` folder.

    ``variant``: weight-file variant such as ``"fp16"``; ``config_overrides`` set e.g. ``dtype`` or
    ``attention_backend``. Raises ``CheckpointMismatchError`` naming missing/unexpected keys and shapes.
    """
    config = CLIPTextConfig.from_transformers(read_config(folder), **config_overrides)
    state_dict = read_model_folder(folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    return config, clip_text_params_from_state_dict(config, state_dict, source=str(folder))
