"""Load a transformers T5 / UMT5 encoder folder (``T5EncoderModel`` / ``UMT5EncoderModel``, e.g. a Wan pipeline's
``text_encoder/``: config.json + safetensors, single or sharded) into jaxvc's ``T5Encoder`` parameters.

The encoder's copy of the tied embedding (``encoder.embed_tokens.weight``) is ignored (``shared.weight`` is read);
so are a full encoder-decoder checkpoint's decoder and LM head, which the encoder does not use.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from jaxvc.convert.state_dict import read_model_config, read_model_folder
from jaxvc.convert.torch_to_flax import fill_params
from jaxvc.models.t5_encoder import T5EncoderConfig, abstract_t5_params

IGNORED_KEYS = (r"^encoder\.embed_tokens\.weight$", r"^decoder\.", r"^lm_head\.")


def t5_params_from_state_dict(config: T5EncoderConfig, state_dict: Mapping[str, np.ndarray], *,
                              source: str = "T5 checkpoint") -> dict:
    """``{"params": ...}`` for ``T5Encoder(config)`` from a transformers-named state dict."""
    if "shared.weight" not in state_dict and "encoder.embed_tokens.weight" in state_dict:
        state_dict = {**state_dict, "shared.weight": state_dict["encoder.embed_tokens.weight"]}
    params = fill_params(abstract_t5_params(config)["params"], state_dict, source=source, ignore=IGNORED_KEYS,
                         dtype=np.dtype(config.param_dtype))
    return {"params": params}


def load_t5_encoder(folder: str | os.PathLike, *, allow_pickle: bool = False,
                    **config_overrides) -> tuple[T5EncoderConfig, dict]:
    """``(T5EncoderConfig, {"params": ...})`` from a transformers T5/UMT5 folder; ``config_overrides`` set e.g.
    ``dtype``. Raises ``CheckpointMismatchError`` naming missing/unexpected keys and shape mismatches."""
    source = str(folder)
    config = T5EncoderConfig.from_transformers(read_model_config(folder, "a transformers T5/UMT5 folder"),
                                               source=os.path.join(source, "config.json"), **config_overrides)
    state_dict = read_model_folder(folder, "model", allow_pickle=allow_pickle)
    return config, t5_params_from_state_dict(config, state_dict, source=source)
