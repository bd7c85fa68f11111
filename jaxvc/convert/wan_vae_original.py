"""The original Wan VAE files (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``) renamed to diffusers' ``AutoencoderKLWan`` keys.

The renaming is the inverse of diffusers' own converters (``scripts/convert_wan_to_diffusers.py``: ``convert_vae``
and ``convert_vae_22``; ``convert_wan_vae_to_diffusers`` in the single-file loader for Wan 2.1). Both layouts share
the top level: ``conv1`` / ``conv2`` are the quant convs, ``{encoder,decoder}.conv1`` the input convs, ``head.0`` /
``head.2`` the output norm and conv, ``middle.0..2`` the mid block. They differ in the levels:
  * Wan 2.1: the encoder's ``downsamples`` is one flat list of residual blocks and resamplers (diffusers keeps it
    flat: ``down_blocks.N``); the decoder's flat ``upsamples`` holds, per level, num_res_blocks + 1 residual blocks
    and then the level's resampler (``up_blocks.L.resnets.J`` / ``up_blocks.L.upsamplers.0``).
  * Wan 2.2: ``encoder.downsamples.L.downsamples.J`` / ``decoder.upsamples.L.upsamples.J`` nest a level's residual
    blocks and, last, its resampler (``down_blocks.L.resnets.J`` / ``down_blocks.L.downsampler``,
    ``up_blocks.L.resnets.J`` / ``up_blocks.L.upsampler``). The averaging / duplicating shortcuts have no weights.
Neither file has a config: the sizes are read from the shapes (``config_from_original``).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from jaxvc.convert.state_dict import WeightFileError
from jaxvc.models.wan_vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAEConfig

# the original Wan 2.2 VAE always folds 2x2 pixel patches into channels before its encoder (vae2_2.py's patchify)
WAN22_PATCH_SIZE = 2

# a residual block's nn.Sequential (norm, SiLU, conv, norm, SiLU, dropout, conv) and its 1x1x1 shortcut
_RESIDUAL_PARTS = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                   "shortcut": "conv_shortcut"}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_WAN22_LEVEL = re.compile(r"^(encoder\.downsamples\.\d+\.downsamples|decoder\.upsamples\.\d+\.upsamples)\.\d+\.")
# Wan 2.2's nested list name, diffusers' block list and resampler names, per side
_WAN22_NESTED = {"encoder": ("downsamples", "down_blocks", "downsampler"),
                 "decoder": ("upsamples", "up_blocks", "upsampler")}
# the resampler's own weights: its 2D conv (after a pad or an upsample) and the temporal conv
_RESAMPLER_PARTS = ("resample.", "time_conv.")


def is_wan22_original(state_dict: Mapping[str, np.ndarray]) -> bool:
    """True for the original Wan 2.2 layout (levels nested as ``encoder.downsamples.L.downsamples.J``)."""
    return any(_WAN22_LEVEL.match(key) for key in state_dict)


def _rename_shared(key: str) -> str:
    """The top-level names both layouts share: quant convs, input convs, heads, mid blocks."""
    key = re.sub(r"^conv1\.", "quant_conv.", key)
    key = re.sub(r"^conv2\.", "post_quant_conv.", key)
    key = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", key)
    key = re.sub(r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out.", key)
    return re.sub(r"^(encoder|decoder)\.middle\.(\d)\.", lambda m: f"{m.group(1)}.mid_block.{_MIDDLE[m.group(2)]}.",
                  key)


def _rename_residual_parts(key: str) -> str:
    for part, name in _RESIDUAL_PARTS.items():
        key = key.replace(f".{part}.", f".{name}.")
    return key


def _wan21_level_key(key: str, num_res_blocks: int) -> str:
    key = re.sub(r"^encoder\.downsamples\.", "encoder.down_blocks.", key)
    match = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", key)
    if match:
        level, position = divmod(int(match.group(1)), num_res_blocks + 2)
        if position <= num_res_blocks:
            key = f"decoder.up_blocks.{level}.resnets.{position}.{match.group(2)}"
        else:
            key = f"decoder.up_blocks.{level}.upsamplers.0.{match.group(2)}"
    return key


def _wan22_level_key(key: str) -> str:
    match = re.match(r"^(encoder|decoder)\.(\w+)\.(\d+)\.(\w+)\.(\d+)\.(.*)$", key)
    if not match:
        return key
    side, outer, level, inner, index, rest = match.groups()
    nested, blocks, resampler = _WAN22_NESTED[side]
    if outer != nested or inner != nested:
        return key
    if rest.startswith(_RESAMPLER_PARTS):  # the level's last entry: diffusers names it without its index
        return f"{side}.{blocks}.{level}.{resampler}.{rest}"
    return f"{side}.{blocks}.{level}.resnets.{index}.{rest}"


def wan21_num_res_blocks(state_dict: Mapping[str, np.ndarray]) -> int:
    """Residual blocks per encoder level of an original Wan 2.1 file: the decoder's first resampler sits at
    ``upsamples.<num_res_blocks + 1>`` (a decoder level holds num_res_blocks + 1 residual blocks, then it)."""
    resamplers = sorted({int(m.group(1)) for key in state_dict
                         if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", key))})
    if resamplers:
        return resamplers[0] - 1
    entries = {int(m.group(1)) for key in state_dict if (m := re.match(r"decoder\.upsamples\.(\d+)\.", key))}
    return max(entries, default=2) - 1  # a single level: its residual blocks only


def original_to_diffusers(state_dict: Mapping[str, np.ndarray], *, source: str = "Wan VAE file"
                          ) -> dict[str, np.ndarray]:
    """Rename an original Wan 2.1 or Wan 2.2 VAE state dict (detected from its keys) to diffusers' keys. Keys that
    no rule names are kept, so the loader reports them as unexpected."""
    wan22 = is_wan22_original(state_dict)
    num_res_blocks = None if wan22 else wan21_num_res_blocks(state_dict)
    out, renamed_from = {}, {}
    for key, value in state_dict.items():
        new = _rename_shared(key)
        new = _wan22_level_key(new) if wan22 else _wan21_level_key(new, num_res_blocks)
        new = _rename_residual_parts(new)
        if new in renamed_from:
            raise WeightFileError(f"{source}: '{renamed_from[new]}' and '{key}' both name diffusers' '{new}'; not "
                                  "an original Wan VAE checkpoint")
        renamed_from[new] = key
        out[new] = value
    return out


def _indices(state_dict: Mapping[str, np.ndarray], pattern: str) -> set[int]:
    return {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}


def config_from_original(state_dict: Mapping[str, np.ndarray], *, wan22: bool, source: str,
                         **overrides) -> WanVAEConfig:
    """Sizes of an original Wan 2.1 (``wan22=False``) or Wan 2.2 VAE from its diffusers-renamed weights. Unstated
    fields keep the defaults both share (no attention inside the levels); Wan 2.2 adds its residual levels, its 2x2
    patchify and, for its 48 latent channels, its latent statistics."""
    version = "2.2" if wan22 else "2.1"

    def shape(key):
        if key not in state_dict:
            raise WeightFileError(f"{source}: '{key}' (diffusers' name) missing; not a Wan {version} VAE checkpoint")
        return state_dict[key].shape

    base_dim, in_channels = shape("encoder.conv_in.weight")[:2]
    z_dim = shape("post_quant_conv.weight")[0]
    out_channels = shape("decoder.conv_out.weight")[0]
    num_levels = len(_indices(state_dict, r"decoder\.up_blocks\.(\d+)\."))
    resampler = "upsampler" if wan22 else "upsamplers.0"
    temporal_up = [f"decoder.up_blocks.{i}.{resampler}.time_conv.weight" in state_dict for i in range(num_levels - 1)]
    fields = dict(base_dim=base_dim, z_dim=z_dim, temperal_downsample=tuple(reversed(temporal_up)),
                  in_channels=in_channels, out_channels=out_channels)
    if wan22:
        # the encoder's levels are base_dim * dim_mult wide; the decoder's input conv decoder_base_dim * dim_mult[-1]
        dim_mult = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // base_dim
                         for i in range(num_levels))
        if in_channels % WAN22_PATCH_SIZE ** 2 or out_channels % WAN22_PATCH_SIZE ** 2:
            raise WeightFileError(f"{source}: encoder.conv1.weight takes {in_channels} channels and decoder.head.2 "
                                  f"gives {out_channels}; the Wan 2.2 VAE codes 2x2 pixel patches, so both must be "
                                  "multiples of 4 (12 for RGB)")
        fields.update(dim_mult=dim_mult, decoder_base_dim=shape("decoder.conv_in.weight")[0] // dim_mult[-1],
                      num_res_blocks=len(_indices(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
                      is_residual=True, patch_size=WAN22_PATCH_SIZE)
        if z_dim == len(WAN22_LATENTS_MEAN):
            fields.update(latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
        else:
            fields.update(latents_mean=None, latents_std=None)
    else:
        # the decoder's levels are base_dim * dim_mult[::-1] wide (Wan 2.1 has one base width)
        fields.update(dim_mult=tuple(shape(f"decoder.up_blocks.{num_levels - 1 - i}.resnets.0.conv1.weight")[0]
                                     // base_dim for i in range(num_levels)),
                      num_res_blocks=len(_indices(state_dict, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")) - 1)
        if z_dim != len(WanVAEConfig.latents_mean):
            fields.update(latents_mean=None, latents_std=None)
    try:
        return WanVAEConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise WeightFileError(f"{source}: the sizes read from the weights (with the overrides) give no "
                              f"valid Wan VAE config: {error}") from error


def load_original_state_dict(state_dict: Mapping[str, np.ndarray], *, source: str,
                             **config_overrides) -> tuple[WanVAEConfig, dict[str, np.ndarray]]:
    """``(WanVAEConfig, diffusers-named state dict)`` of an original Wan 2.1 or Wan 2.2 VAE file's weights."""
    renamed = original_to_diffusers(state_dict, source=source)
    config = config_from_original(renamed, wan22=is_wan22_original(state_dict), source=source, **config_overrides)
    return config, renamed
