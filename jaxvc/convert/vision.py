"""Load the evaluation metrics' backbones from local transformers folders (config.json + safetensors).

- a ``CLIPModel`` folder (e.g. ``openai/clip-vit-base-patch32``): the vision tower with ``visual_projection``, the
  text tower (``jaxvc/convert/clip.py``) and ``text_projection``, which CLIP-T needs;
- a ``ViTModel`` folder (e.g. ``facebook/dino-vits16``) for DINO-I. Its keys are renamed onto the CLIP-style module
  names of ``jaxvc/models/vision_transformer.py``; the pooler (dense + tanh) is not used by DINO-I and is skipped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxvc.convert.clip import clip_text_params_from_state_dict, read_config
from jaxvc.convert.state_dict import WeightFileError, read_model_folder
from jaxvc.convert.torch_to_flax import CheckpointMismatchError, fill_params, rename_keys
from jaxvc.models.clip_text import CLIPTextConfig
from jaxvc.models.vision_transformer import VisionConfig, abstract_vision_params

WEIGHTS_NAME = "model"
CLIP_VISION_RENAME = ((r"^vision_model\.", ""),)
CLIP_VISION_IGNORED = (r"(^|\.)embeddings\.position_ids$", r"^text_model\.", r"^text_projection\.",
                       r"^logit_scale$")
# transformers' saved ViT names -> the CLIP-style names of VisionTransformer (attention.output before output).
VIT_RENAME = (
    (r"^vit\.", ""),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"encoder.layers.\1.self_attn.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"encoder.layers.\1.self_attn.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"encoder.layers.\1.self_attn.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.layer_norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.layer_norm2."),
    (r"^layernorm\.", "post_layernorm."),
    # transformers 5's in-memory names (what torch.save(model.state_dict()) writes), after the prefix rule above
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.layer_norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.layer_norm2."),
    (r"^layers\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
)
VIT_IGNORED = (r"^pooler\.", r"^embeddings\.mask_token$", r"^classifier\.")


def _vit_tables(state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """ViT keeps the class token as (1, 1, D) and positions as (1, 1 + N, D); CLIP as (D,) and (1 + N, D)."""
    state = dict(state_dict)
    for old, new in (("embeddings.cls_token", "embeddings.class_embedding"),
                     ("embeddings.position_embeddings", "embeddings.position_embedding.weight")):
        if old in state:
            value = np.asarray(state.pop(old))
            if value.ndim != 3 or value.shape[0] != 1:
                raise CheckpointMismatchError(f"{source}: '{old}' has shape {value.shape}; expected (1, tokens, "
                                              "hidden_size)")
            state[new] = value[0, 0] if old.endswith("cls_token") else value[0]
    return state


def vision_params_from_state_dict(config: VisionConfig, state_dict: Mapping[str, np.ndarray],
                                  source: str = "vision checkpoint") -> dict:
    """``{"params": ...}`` for ``VisionTransformer(config)`` from a transformers-named torch state dict."""
    if config.family == "clip":
        state, ignore = rename_keys(state_dict, CLIP_VISION_RENAME), CLIP_VISION_IGNORED
    else:
        state, ignore = _vit_tables(rename_keys(state_dict, VIT_RENAME), source), VIT_IGNORED
    params = fill_params(abstract_vision_params(config)["params"], state, source=source, ignore=ignore,
                         dtype=np.dtype(config.param_dtype))
    return {"params": params}


def load_vision_tower(folder: str | os.PathLike, *, allow_pickle: bool = False,
                      **config_overrides) -> tuple[VisionConfig, dict]:
    """``(VisionConfig, {"params": ...})`` from a ``CLIPModel``, ``CLIPVisionModelWithProjection`` or ``ViTModel``
    folder. Raises ``CheckpointMismatchError`` naming missing/unexpected keys and shapes."""
    config = VisionConfig.from_transformers(read_config(folder), source=str(Path(folder) / "config.json"),
                                            **config_overrides)
    state_dict = read_model_folder(folder, WEIGHTS_NAME, allow_pickle=allow_pickle)
    return config, vision_params_from_state_dict(config, state_dict, source=str(folder))


def load_clip_text_with_projection(folder: str | os.PathLike, *, allow_pickle: bool = False,
                                   **config_overrides) -> tuple[CLIPTextConfig, dict, np.ndarray]:
    """``(CLIPTextConfig, {"params": ...}, text_projection (D, P))`` from a full ``CLIPModel`` folder: the text
    embedding of CLIP-T is ``pooler_output @ text_projection``."""
    raw = read_config(folder)
    if raw.get("model_type") != "clip":
        raise WeightFileError(f"{Path(folder) / 'config.json'}: model_type '{raw.get('model_type')}'; CLIP-T needs "
                              "a full CLIPModel folder (model_type 'clip', both towers and their projections)")
    config = CLIPTextConfig.from_transformers(raw, **config_overrides)
    state_dict = dict(read_model_folder(folder, WEIGHTS_NAME, allow_pickle=allow_pickle))
    projection = state_dict.pop("text_projection.weight", None)
    if projection is None:
        raise CheckpointMismatchError(f"{folder}: no 'text_projection.weight' in the checkpoint")
    expected = (int(raw.get("projection_dim", 512)), config.hidden_size)
    if tuple(projection.shape) != expected:
        raise CheckpointMismatchError(f"{folder}: 'text_projection.weight' has shape {tuple(projection.shape)}; "
                                      f"expected (projection_dim, hidden_size) = {expected}")
    params = clip_text_params_from_state_dict(config, state_dict, source=str(folder))
    return config, params, np.asarray(projection, np.float32).T
