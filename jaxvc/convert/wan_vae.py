"""Load a Wan video VAE into jaxvc's ``AutoencoderKLWan`` parameters.

Two layouts are read:
  * a diffusers ``vae/`` folder (``AutoencoderKLWan``: config.json + safetensors, single, sharded or a variant), for
    Wan 2.1 and Wan 2.2 alike;
  * the original Wan 2.1 file (``Wan2.1_VAE.pth`` / ``.safetensors``: ``encoder.downsamples.0.residual.0.gamma``,
    ``decoder.upsamples.3.resample.1.weight``, ``conv1`` / ``conv2`` for the quant convs, ...). It has no config: the
    sizes are read from the shapes and the defaults of Wan 2.1 fill the rest. The original Wan 2.2 file names its
    residual levels differently and is refused with a clear error (use the diffusers folder).

The norms' ``gamma`` is stored (C, 1, 1[, 1]) in torch; jaxvc keeps (C,).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxvc.convert.state_dict import WeightFileError, read_model_config, read_model_folder, read_weight_file
from jaxvc.convert.torch_to_flax import fill_params
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


_RESIDUAL_PARTS = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                   "shortcut": "conv_shortcut"}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def original_to_diffusers(state_dict: Mapping[str, np.ndarray], *, num_res_blocks: int = 2,
                          source: str = "Wan VAE file") -> dict[str, np.ndarray]:
    """Rename an original Wan 2.1 VAE state dict to diffusers' keys (the inverse layout of diffusers'
    ``convert_wan_vae_to_diffusers``, for any ``num_res_blocks``: the decoder's flat ``upsamples`` list holds, per
    level, num_res_blocks + 1 residual blocks and then the level's resampler)."""
    if any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", key) for key in state_dict):
        raise WeightFileError(f"{source}: this is the original Wan 2.2 VAE layout, which jaxvc does not read; use the "
                              "diffusers vae/ folder (Wan2.2-TI2V-5B-Diffusers/vae)")
    per_level = num_res_blocks + 2
    out = {}
    for key, value in state_dict.items():
        new = key
        new = re.sub(r"^conv1\.", "quant_conv.", new)
        new = re.sub(r"^conv2\.", "post_quant_conv.", new)
        new = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", new)
        new = re.sub(r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out.", new)
        new = re.sub(r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out.", new)
        new = re.sub(r"^(encoder|decoder)\.middle\.(\d)\.",
                     lambda m: f"{m.group(1)}.mid_block.{_MIDDLE[m.group(2)]}.", new)
        new = re.sub(r"^encoder\.downsamples\.", "encoder.down_blocks.", new)
        match = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", new)
        if match:
            level, position = divmod(int(match.group(1)), per_level)
            rest = match.group(2)
            if position <= num_res_blocks:
                new = f"decoder.up_blocks.{level}.resnets.{position}.{rest}"
            else:
                new = f"decoder.up_blocks.{level}.upsamplers.0.{rest}"
        for part, name in _RESIDUAL_PARTS.items():
            new = new.replace(f".{part}.", f".{name}.")
        out[new] = value
    return out


def config_from_original(state_dict: Mapping[str, np.ndarray], *, source: str, **overrides) -> WanVAEConfig:
    """Sizes of an original Wan 2.1 VAE from its (diffusers-renamed) weights."""
    def shape(key):
        if key not in state_dict:
            raise WeightFileError(f"{source}: '{key}' missing; not a Wan 2.1 VAE checkpoint")
        return state_dict[key].shape

    base_dim = shape("encoder.conv_in.weight")[0]
    z_dim = shape("post_quant_conv.weight")[0]
    levels = {int(m.group(1)) for key in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", key))}
    resnets = {int(m.group(1)) for key in state_dict if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.",
                                                                         key))}
    num_levels = len(levels)
    dim_mult = [shape(f"decoder.up_blocks.{num_levels - 1 - i}.resnets.0.conv1.weight")[0] // base_dim
                for i in range(num_levels)]
    temporal_up = [f"decoder.up_blocks.{i}.upsamplers.0.time_conv.weight" in state_dict
                   for i in range(num_levels - 1)]
    fields = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=len(resnets) - 1,
                  temperal_downsample=tuple(reversed(temporal_up)), in_channels=shape("encoder.conv_in.weight")[1],
                  out_channels=shape("decoder.conv_out.weight")[0])
    if z_dim != len(WanVAEConfig.latents_mean):
        fields.update(latents_mean=None, latents_std=None)
    return WanVAEConfig(**{**fields, **overrides})


def load_wan_vae(path: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
                 **config_overrides) -> tuple[WanVAEConfig, dict]:
    """``(WanVAEConfig, {"params": ...})`` from a diffusers ``vae/`` folder or an original Wan 2.1 VAE file.

    ``allow_pickle``: read ``.pth``/``.bin`` files (restricted unpickler). ``config_overrides`` set e.g. ``dtype``.
    Raises ``CheckpointMismatchError`` naming every missing/unexpected key and shape mismatch."""
    path = Path(path)
    if path.is_dir():
        config = config_from_diffusers(read_model_config(path, "a diffusers Wan VAE folder"),
                                       source=str(path / "config.json"), **config_overrides)
        state_dict = read_model_folder(path, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    elif path.is_file():
        raw = read_weight_file(path, allow_pickle=allow_pickle)
        per_level = {int(m.group(1)) for key in raw if (m := re.match(r"decoder\.upsamples\.(\d+)\.", key))}
        resample = sorted({int(m.group(1)) for key in raw
                           if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", key))})
        num_res_blocks = resample[0] - 1 if resample else max(per_level, default=2) - 1
        state_dict = original_to_diffusers(raw, num_res_blocks=num_res_blocks, source=str(path))
        config = config_from_original(state_dict, source=str(path), **config_overrides)
    else:
        raise WeightFileError(f"{path}: neither a diffusers Wan VAE folder nor a Wan VAE weight file")
    return config, wan_vae_params_from_state_dict(config, state_dict, source=str(path))
