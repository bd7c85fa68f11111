"""Load a Wan transformer into jaxvc's ``WanTransformer3D`` parameters.

Two layouts are read:
  * a diffusers ``transformer/`` folder (``WanTransformer3DModel``: config.json + safetensors, single, sharded or an
    ``fp16``-style variant), with fused projections (``to_qkv``, ``to_kv``, ``to_added_kv``) split back;
  * a single file in the original Wan layout (``blocks.0.self_attn.q.weight``, ``head.modulation``, ... as the
    Wan-AI repositories and ComfyUI ship them, optionally prefixed ``model.diffusion_model.``). It has no config:
    the sizes are read from the weights' shapes, and the head count from ``attention_head_dim`` (128 in every
    released Wan).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxvc.convert.state_dict import WeightFileError, read_model_config, read_model_folder, read_weight_file
from jaxvc.convert.torch_to_flax import fill_params, rename_keys
from jaxvc.models.unet import UnsupportedConfigError
from jaxvc.models.wan import WanConfig, abstract_wan_params

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                 "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim",
                 "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len")
# diffusers' WanTransformer3DModel options jaxvc's model does not have, with the value it implements.
FIXED_OPTIONS = {"qk_norm": "rms_norm_across_heads"}

# Original Wan names -> diffusers names, applied in order. The original block calls the cross-attention's norm
# "norm3" and the feed-forward's "norm2"; diffusers swaps them.
ORIGINAL_RENAMES = (
    (r"^model\.diffusion_model\.", ""),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.o\.", ".to_out.0."),
    (r"\.(q|k|v)\.", r".to_\1."),
    (r"\.k_img\.", ".add_k_proj."),
    (r"\.v_img\.", ".add_v_proj."),
    (r"\.norm_k_img\.", ".norm_added_k."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"\.modulation$", ".scale_shift_table"),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm__cross."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.norm__cross\.", r"\1.norm2."),
)
# diffusers keys that are known and carry nothing jaxvc uses (an unused q-norm of the image keys in old files).
IGNORED_KEYS = (r"\.norm_added_q\.",)


def read_config(folder: str | os.PathLike) -> dict:
    return read_model_config(folder, "a diffusers Wan transformer folder (or give one original-layout file)")


def config_from_diffusers(config: Mapping[str, Any], *, source: str = "config.json", **overrides) -> WanConfig:
    """``WanConfig`` from a diffusers ``WanTransformer3DModel`` config.json dict (options jaxvc lacks are refused)."""
    class_name = config.get("_class_name", "WanTransformer3DModel")
    if class_name != "WanTransformer3DModel":
        raise UnsupportedConfigError(f"{source}: _class_name '{class_name}' is not 'WanTransformer3DModel' (VACE, "
                                     "Animate and other Wan variants have extra modules jaxvc does not implement)")
    for key, expected in FIXED_OPTIONS.items():
        if key in config and config[key] != expected:
            raise UnsupportedConfigError(f"{source}: {key}={config[key]!r} is not supported (expected {expected!r})")
    fields = {key: config[key] for key in CONFIG_FIELDS if key in config}
    if fields.get("out_channels") is None:
        fields["out_channels"] = fields.get("in_channels", WanConfig.in_channels)
    return WanConfig(**{**fields, **overrides})


def split_fused_projections(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``to_qkv`` -> ``to_q``/``to_k``/``to_v``, ``to_kv`` -> ``to_k``/``to_v``, ``to_added_kv`` -> ``add_k_proj``/
    ``add_v_proj`` (what ``fuse_projections()`` makes, if a fused model was saved)."""
    splits = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
              "to_added_kv": ("add_k_proj", "add_v_proj")}
    out = {}
    for key, value in state_dict.items():
        match = re.search(r"\.(to_qkv|to_kv|to_added_kv)\.(weight|bias)$", key)
        if match is None:
            out[key] = value
            continue
        names = splits[match.group(1)]
        for name, part in zip(names, np.split(value, len(names), axis=0)):
            out[key[:match.start()] + f".{name}.{match.group(2)}"] = part
    return out


def config_from_original(state_dict: Mapping[str, np.ndarray], *, source: str, attention_head_dim: int = 128,
                         **overrides) -> WanConfig:
    """Infer a ``WanConfig`` from the (diffusers-renamed) weights of an original-layout Wan file."""
    def shape(key):
        if key not in state_dict:
            raise WeightFileError(f"{source}: '{key}' missing; not a Wan transformer checkpoint")
        return state_dict[key].shape

    dim, in_channels, *patch = shape("patch_embedding.weight")
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
    if dim % attention_head_dim:
        raise WeightFileError(f"{source}: model width {dim} is not a multiple of attention_head_dim="
                              f"{attention_head_dim}; pass the right attention_head_dim")
    fields = dict(patch_size=tuple(patch), in_channels=in_channels, num_layers=len(blocks),
                  num_attention_heads=dim // attention_head_dim, attention_head_dim=attention_head_dim,
                  out_channels=shape("proj_out.weight")[0] // int(np.prod(patch)),
                  text_dim=shape("condition_embedder.text_embedder.linear_1.weight")[1],
                  freq_dim=shape("condition_embedder.time_embedder.linear_1.weight")[1],
                  ffn_dim=shape("blocks.0.ffn.net.0.proj.weight")[0],
                  cross_attn_norm="blocks.0.norm2.weight" in state_dict)
    if "condition_embedder.image_embedder.norm1.weight" in state_dict:
        fields["image_dim"] = shape("condition_embedder.image_embedder.norm1.weight")[0]
        fields["added_kv_proj_dim"] = shape("blocks.0.attn2.add_k_proj.weight")[1]
    if "condition_embedder.image_embedder.pos_embed" in state_dict:
        fields["pos_embed_seq_len"] = shape("condition_embedder.image_embedder.pos_embed")[1]
    return WanConfig(**{**fields, **overrides})


def wan_params_from_state_dict(config: WanConfig, state_dict: Mapping[str, np.ndarray], *,
                               source: str = "Wan checkpoint") -> dict:
    """``{"params": ...}`` for ``WanTransformer3D(config)`` from a diffusers-named state dict."""
    state_dict = split_fused_projections(state_dict)
    params = fill_params(abstract_wan_params(config)["params"], state_dict, source=source, ignore=IGNORED_KEYS,
                         dtype=np.dtype(config.param_dtype))
    return {"params": params}


def load_wan(path: str | os.PathLike, *, variant: str | None = None, allow_pickle: bool = False,
             attention_head_dim: int = 128, **config_overrides) -> tuple[WanConfig, dict]:
    """``(WanConfig, {"params": ...})`` from a diffusers ``transformer/`` folder or an original-layout Wan file.

    ``config_overrides`` set e.g. ``dtype``, ``attention_backend`` or ``remat``. Raises ``CheckpointMismatchError``
    naming every missing/unexpected key and shape mismatch."""
    path = Path(path)
    if path.is_dir():
        config = config_from_diffusers(read_config(path), source=str(path / "config.json"), **config_overrides)
        state_dict = read_model_folder(path, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
    elif path.is_file():
        state_dict = rename_keys(read_weight_file(path, allow_pickle=allow_pickle), ORIGINAL_RENAMES)
        config = config_from_original(state_dict, source=str(path), attention_head_dim=attention_head_dim,
                                      **config_overrides)
    else:
        raise WeightFileError(f"{path}: neither a diffusers transformer folder nor a Wan weight file")
    return config, wan_params_from_state_dict(config, state_dict, source=str(path))
