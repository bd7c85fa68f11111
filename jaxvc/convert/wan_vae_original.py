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
from jaxvc.models.wan_vae import WanVAEConfig

# The Wan 2.2 VAE's per-channel latent statistics. The original file does not hold them; these are the values of
# Wan2.2's ``Wan2_2_VAE`` (wan/modules/vae2_2.py) and of the Wan2.2-TI2V-5B-Diffusers vae/config.json.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
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
