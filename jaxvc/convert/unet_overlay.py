"""A UNet state dict, whole or partial, over a loaded UNet's weights: how VideoMaker's authors load their release.

VideoMaker's ``inference.py`` builds AnimateDiff's UNet from SD1.5 + a motion module and then loads
``human_pytorch_model.bin`` (its trained spatial self-attention and motion modules) with
``unet.load_state_dict(state_dict, strict=False)``. ``overlay_unet_weights`` does the same to jaxvc's UNet
variables, without the silence of ``strict=False``: the keys the file lacks keep the loaded weights, but a key that
names no parameter of the model, or a shape that differs, is an error listing them (a wrong file loads nothing).

Accepted keys: diffusers' ``UNetMotionModel`` (``...motion_modules.0.transformer_blocks.0.attn1.to_q.weight``) or
AnimateDiff's ``UNet3DConditionModel`` (its spatial keys are diffusers', its motion modules in the original layout,
``...motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight``), optionally all
under one prefix (``module.``, ``unet.``) as training scripts save them. Motion positional tables (``pos_encoder.pe``,
``pos_embed.pe``) are checked against the sinusoidal formula as in ``jaxvc/convert/unet.py``; one that differs
replaces the table the model uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import traverse_util

from jaxvc.convert.animatediff import original_to_diffusers
from jaxvc.convert.state_dict import WeightFileError, read_weight_file
from jaxvc.convert.torch_to_flax import fill_params, rename_keys
from jaxvc.convert.unet import abstract_variables, split_position_tables
from jaxvc.models.motion import BUFFERS
from jaxvc.models.unet import UNetConfig

# the prefixes of wrapped models' saves (DataParallel's module., a pipeline's unet.); no UNet key starts with one
PREFIXES = r"^(?:module\.|unet\.|model\.)+"


def overlay_unet_weights(config: UNetConfig, variables: dict, path: str | Path, *,
                         allow_pickle: bool = False) -> tuple[dict, int]:
    """``variables`` (``{"params": ...}`` and maybe ``"buffers"``, as ``load_unet`` returns them) with the
    parameters ``path`` holds put in their place; returns the new variables and how many tensors were replaced."""
    state = read_weight_file(path, allow_pickle=allow_pickle)  # ({"state_dict": ...} wrappers unwrapped)
    state = original_to_diffusers(rename_keys(state, ((PREFIXES, ""),)), source=str(path))
    if not state:
        raise WeightFileError(f"{path}: no tensors")
    abstract = abstract_variables(config)["params"]
    max_len = config.motion.max_seq_length if config.motion is not None else None
    weights, differing = split_position_tables(state, abstract, source=str(path), max_seq_length=max_len)
    given = traverse_util.flatten_dict(fill_params(abstract, weights, source=str(path), partial=True,
                                                   dtype=np.dtype(config.param_dtype)))
    params = traverse_util.flatten_dict(dict(variables["params"]))
    params.update(given)
    out = {**variables, "params": traverse_util.unflatten_dict(params)}
    if differing:
        buffers = traverse_util.flatten_dict(dict(variables.get(BUFFERS, {})))
        buffers.update({block + ("pos_embed",): table for block, table in differing.items()})
        out[BUFFERS] = traverse_util.unflatten_dict(buffers)
    return out, len(given) + len(differing)
