"""Load a Wan video VAE into jaxvc's ``AutoencoderKLWan`` parameters.

Two layouts are read:
  * a diffusers ``vae/`` folder (``AutoencoderKLWan``: config.json + safetensors, single, sharded or a variant), for
    Wan 2.1 and Wan 2.2 alike;
  * the original single file of Wan 2.1 (``Wan2.1_VAE.pth`` / ``.safetensors``; keys such as
    ``encoder.downsamples.0.residual.0.gamma``, ``decoder.upsamples.3.resample.1.weight``, ``conv1`` / ``conv2``
    for the quant convs) or of Wan 2.2 (``Wan2.2_VAE.pth``, the TI2V-5B VAE; its levels nested as
    ``encoder.downsamples.0.downsamples.0.residual.0.gamma``), told apart by the keys and renamed by
    ``wan_vae_original``. It has no config: the sizes are read from the shapes and the released models' constants
    fill the rest (Wan 2.2: the 2x2 patchify and, for its 48 channels, the latent statistics), so it loads the same
    parameters as the diffusers folder converted from it.

The norms' ``gamma`` is stored (C, 1, 1[, 1]) in torch; jaxvc keeps (C,).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxvc.convert.state_dict import WeightFileError, read_model_config, read_model_folder, read_weight_file
from jaxvc.convert.torch_to_flax import fill_params
from jaxvc.convert.wan_vae_original import load_original_state_dict
from jaxvc.models.unet import UnsupportedConfigError
from jaxvc.models.wan_vae import WanVAEConfig, abstract_wan_vae_params

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_FIELDS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                 "temperal_downsample", "is_residual", "in_channels", "out_channels", "patch_size", "latents_mean",
                 "latents_std")


def config_from_diffusers(config: Mapping[str, Any], *, source: str = "config.json", **overrides) -> WanVAEConfig:
    """``WanVAEConfig`` from a diffusers ``AutoencoderKLWan`` config.json dict."""
    class_name = config.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
        raise UnsupportedConfigError(f"{source}: _class_name '{class_name}' is not 'AutoencoderKLWan'")
    fields = {key: config[key] for key in CONFIG_FIELDS if key in config}
    try:
        vae = WanVAEConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise UnsupportedConfigError(f"{source}: {error}") from error
    for key, value in (("scale_factor_spatial", vae.downsample_factor), ("scale_factor_temporal",
                                                                         vae.temporal_factor)):
        if config.get(key) is not None and int(config[key]) != value:
            raise UnsupportedConfigError(f"{source}: {key}={config[key]} disagrees with the architecture, which "
                                         f"gives {value}")
    return vae


def wan_vae_params_from_state_dict(config: WanVAEConfig, state_dict: Mapping[str, np.ndarray], *,
                                   source: str = "Wan VAE checkpoint") -> dict:
    """``{"params": ...}`` for ``AutoencoderKLWan(config)`` from a diffusers-named state dict."""
    state_dict = {key: np.reshape(value, (-1,)) if key.endswith(".gamma") else value
                  for key, value in state_dict.items()}
    params = fill_params(abstract_wan_vae_params(config)["params"], state_dict, source=source,
                         dtype=np.dtype(config.param_dtype))
    return {"params": params}


def load_wan_vae(path: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
                 **config_overrides) -> tuple[WanVAEConfig, dict]:
    """``(WanVAEConfig, {"params": ...})`` from a diffusers ``vae/`` folder or an original Wan 2.1 / Wan 2.2 VAE file
    (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``; the layout is read from the keys, the sizes from the shapes).

    ``allow_pickle``: read ``.pth``/``.bin`` files (restricted unpickler). ``config_overrides`` set e.g. ``dtype``.
    Raises ``CheckpointMismatchError`` naming every missing/unexpected key and shape mismatch."""
    path = Path(path)
    if path.is_dir():
        config = config_from_diffusers(read_model_config(path, "a diffusers Wan VAE folder"),
                                       source=str(path / "config.json"), **config_overrides)
        state_dict = read_model_folder(path, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    elif path.is_file():
        config, state_dict = load_original_state_dict(read_weight_file(path, allow_pickle=allow_pickle),
                                                      source=str(path), **config_overrides)
    else:
        raise WeightFileError(f"{path}: neither a diffusers Wan VAE folder nor a Wan VAE weight file")
    return config, wan_vae_params_from_state_dict(config, state_dict, source=str(path))
