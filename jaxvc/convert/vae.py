"""Load a diffusers ``vae/`` folder (config.json + safetensors) into jaxvc's ``AutoencoderKL`` parameters.

Handles single files, sharded indexes and ``fp16``-style variants (through ``read_model_folder``), and the deprecated
attention names of older diffusers files (``query``/``key``/``value``/``proj_attn`` -> ``to_q``/``to_k``/``to_v``/
``to_out.0``; a 1x1-conv-shaped 4-D weight there is accepted as the linear weight it stands for, as diffusers does).
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from jaxvc.convert.state_dict import read_model_config, read_model_folder
from jaxvc.convert.torch_to_flax import fill_params, rename_keys
from jaxvc.models.vae import VAEConfig, abstract_vae_params

WEIGHTS_NAME = "diffusion_pytorch_model"

# Old diffusers AttentionBlock names inside the mid blocks' attentions -> the current Attention names.
DEPRECATED_ATTENTION_RENAMES = (
    (r"(\.attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(\.attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(\.attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)


def read_config(folder: str | os.PathLike) -> dict:
    return read_model_config(folder, "a diffusers VAE folder")


def vae_params_from_state_dict(config: VAEConfig, state_dict: Mapping[str, np.ndarray],
                               source: str = "VAE checkpoint") -> dict:
    """``{"params": ...}`` for ``AutoencoderKL(config)`` from a diffusers-named torch state dict."""
    state_dict = rename_keys(state_dict, DEPRECATED_ATTENTION_RENAMES)
    params = fill_params(abstract_vae_params(config)["params"], state_dict, source=source,
                         dtype=np.dtype(config.param_dtype))
    return {"params": params}


def load_vae(folder: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
             **config_overrides) -> tuple[VAEConfig, dict]:
    """``(VAEConfig, {"params": ...})`` from a diffusers ``vae/`` folder.

    ``variant``: weight-file variant such as ``"fp16"``; ``config_overrides`` set e.g. ``dtype`` or
    ``attention_backend``. Raises ``CheckpointMismatchError`` naming missing/unexpected keys and shapes.
    """
    config = VAEConfig.from_diffusers(read_config(folder), **config_overrides)
    state_dict = read_model_folder(folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    return config, vae_params_from_state_dict(config, state_dict, source=str(folder))
