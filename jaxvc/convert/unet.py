"""Load ``UNetMotion`` parameters from local diffusers files, and translate diffusers UNet configs.

Accepted inputs (``load_unet``):
  * a diffusers pipeline's ``unet/`` folder (``UNet2DConditionModel``: config.json + safetensors, single, sharded
    ``*.safetensors.index.json`` or a variant such as ``fp16``), optionally with a motion adapter given as
      - a diffusers ``MotionAdapter`` folder (config.json + weights), or
      - one motion-module file: original AnimateDiff (``mm_sd_v15_v2.ckpt``/``.safetensors``) or diffusers layout
        (see ``jaxvc.convert.animatediff``);
  * a saved ``UNetMotionModel`` folder (motion modules already inside).

Every key and shape is checked (``CheckpointMismatchError`` names the offending keys). Motion positional tables
(``*.pos_embed.pe``) are buffers, not parameters: they are checked against the sinusoidal formula; one that differs
is kept (with a warning) in the returned variables' ``"buffers"`` collection, which the model then uses.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxvc.convert.state_dict import read_model_config, read_model_folder
from jaxvc.convert.torch_to_flax import CheckpointMismatchError, fill_params, torch_key_to_module_path
from jaxvc.models.embeddings import sinusoidal_positions
from jaxvc.models.motion import BUFFERS
from jaxvc.models.unet import MotionConfig, UNetConfig, UNetMotion, UnsupportedConfigError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"
POSITION_KEY = re.compile(r"\.pos_embed\.pe$")

# diffusers options jaxvc does not implement: (key, the values that behave like jaxvc's UNet)
_REQUIRED = (
    ("center_input_sample", (False, None)), ("act_fn", ("silu", "swish", None)),
    ("mid_block_type", ("UNetMidBlock2DCrossAttn",)), ("only_cross_attention", (False, None)),
    ("dual_cross_attention", (False, None)), ("class_embed_type", (None,)), ("num_class_embeds", (None,)),
    ("addition_embed_type", (None, "text")), ("encoder_hid_dim", (None,)), ("encoder_hid_dim_type", (None,)),
    ("resnet_time_scale_shift", ("default", "scale_shift", None)), ("resnet_skip_time_act", (False, None)),
    ("resnet_out_scale_factor", (1.0, 1, None)), ("time_embedding_type", ("positional", None)),
    ("time_embedding_dim", (None,)), ("time_embedding_act_fn", (None,)), ("timestep_post_act", (None,)),
    ("time_cond_proj_dim", (None,)), ("conv_in_kernel", (3, None)), ("conv_out_kernel", (3, None)),
    ("attention_type", ("default", None)), ("class_embeddings_concat", (False, None)),
    ("mid_block_only_cross_attention", (None, False)), ("cross_attention_norm", (None,)),
    ("reverse_transformer_layers_per_block", (None,)), ("reverse_temporal_transformer_layers_per_block", (None,)),
    ("mid_block_layers", (1, None)),
)


def _unsupported(source: str, key: str, value, expected) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{source}: '{key}' = {value!r} is not supported by jaxvc's UNet "
                                  f"(supported: {expected})")


def _uniform(value, source: str, key: str) -> int:
    """An int, or a per-block list whose entries are all equal (jaxvc keeps one count for every motion module)."""
    if isinstance(value, (list, tuple)):
        flat = [v for item in value for v in (item if isinstance(item, (list, tuple)) else [item])]
        if len(set(flat)) != 1:
            raise _unsupported(source, key, value, "the same count for every block")
        return int(flat[0])
    return int(value)


def translate_diffusers_config(unet_config: Mapping[str, Any], motion_adapter_config: Mapping[str, Any] | None = None,
                               *, source: str = "unet config.json", adapter_source: str = "motion adapter config.json",
                               **overrides) -> UNetConfig:
    """``UNetConfig`` from a diffusers ``UNet2DConditionModel``/``UNetMotionModel`` config (+ ``MotionAdapter``).

    ``overrides`` replace UNetConfig fields (dtype, remat, attention_backend, ...); ``norm_over_frames`` sets the
    motion GroupNorm mode.
    """
    cfg = dict(unet_config)
    norm_over_frames = overrides.pop("norm_over_frames", True)
    class_name = cfg.get("_class_name", "UNet2DConditionModel")
    if class_name not in ("UNet2DConditionModel", "UNetMotionModel"):
        raise UnsupportedConfigError(f"{source}: _class_name '{class_name}' is not a UNet2DConditionModel or "
                                     "UNetMotionModel")
    is_motion_unet = class_name == "UNetMotionModel" or any("Motion" in t for t in cfg.get("down_block_types", ()))
    for key, allowed in _REQUIRED:
        if key in cfg and cfg[key] not in allowed:
            raise _unsupported(source, key, cfg[key], allowed)
    if not cfg.get("flip_sin_to_cos", True) and is_motion_unet:
        raise _unsupported(source, "flip_sin_to_cos", False, (True,))
    if cfg.get("dropout", 0.0):
        logger.warning("%s: dropout %s is ignored (jaxvc's UNet has no dropout)", source, cfg["dropout"])
    cross_dim = cfg.get("cross_attention_dim", 1280)
    if isinstance(cross_dim, (list, tuple)):
        if len(set(cross_dim)) != 1:
            raise _unsupported(source, "cross_attention_dim", cross_dim, "one int for every block")
        cross_dim = cross_dim[0]
    block_out_channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(block_out_channels)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # SD's legacy name = heads
    transformer_layers = cfg.get("transformer_layers_per_block", 1)
    if isinstance(transformer_layers, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in transformer_layers):
        raise _unsupported(source, "transformer_layers_per_block", transformer_layers, "an int per block")
    mid_layers = cfg.get("transformer_layers_per_mid_block")
    last = transformer_layers if isinstance(transformer_layers, int) else transformer_layers[-1]
    if mid_layers not in (None, last):
        raise _unsupported(source, "transformer_layers_per_mid_block", mid_layers,
                           f"the last level's transformer_layers_per_block ({last})")
    fields = dict(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
        down_block_types=tuple(cfg.get("down_block_types", UNetConfig.down_block_types)),
        up_block_types=tuple(cfg.get("up_block_types", UNetConfig.up_block_types)),
        block_out_channels=block_out_channels, layers_per_block=cfg.get("layers_per_block", 2),
        attention_heads=heads, transformer_layers_per_block=transformer_layers, cross_attention_dim=int(cross_dim),
        norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=float(cfg.get("norm_eps", 1e-5)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        downsample_padding=cfg.get("downsample_padding", 1),
        mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
        resnet_time_scale_shift=cfg.get("resnet_time_scale_shift") or "default",
        addition_embed_type=cfg.get("addition_embed_type"),
        addition_embed_type_num_heads=int(cfg.get("addition_embed_type_num_heads", 64)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0.0)))
    if cfg.get("norm_num_groups", 32) is None:
        raise _unsupported(source, "norm_num_groups", None, "an int")
    if isinstance(heads, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in heads):
        raise _unsupported(source, "num_attention_heads", heads, "an int or one int per block")

    motion = None
    if motion_adapter_config is not None:
        if is_motion_unet:
            raise ValueError(f"{source}: this UNetMotionModel already holds motion modules; do not add a motion "
                             f"adapter ({adapter_source})")
        motion = _motion_from_adapter(dict(motion_adapter_config), fields, adapter_source, norm_over_frames)
    elif is_motion_unet:
        reverse_heads = cfg.get("reverse_motion_num_attention_heads")
        motion_heads = cfg.get("motion_num_attention_heads", 8)
        expected_reverse = motion_heads if isinstance(motion_heads, int) else list(reversed(motion_heads))
        if reverse_heads is not None and reverse_heads != expected_reverse:
            raise _unsupported(source, "reverse_motion_num_attention_heads", reverse_heads, expected_reverse)
        motion = MotionConfig(
            heads=motion_heads if isinstance(motion_heads, int) else tuple(motion_heads),
            layers_per_block=_uniform(cfg.get("temporal_transformer_layers_per_block", 1), source,
                                      "temporal_transformer_layers_per_block"),
            max_seq_length=int(cfg.get("motion_max_seq_length", 32)),
            use_mid_block=bool(cfg.get("use_motion_mid_block", True)),
            mid_layers_per_block=_uniform(cfg.get("temporal_transformer_layers_per_mid_block", 1) or 1, source,
                                          "temporal_transformer_layers_per_mid_block"),
            norm_over_frames=norm_over_frames)
    if motion is not None and not isinstance(motion.heads, int) and len(motion.heads) != levels:
        raise ValueError(f"{adapter_source}: {len(motion.heads)} motion head counts for {levels} levels")
    return UNetConfig(**fields, motion=motion, **overrides)


def _motion_from_adapter(adapter: dict, unet_fields: dict, source: str, norm_over_frames: bool) -> MotionConfig:
    """MotionConfig from a diffusers ``MotionAdapter`` config, checked against the UNet it is added to."""
    if adapter.get("conv_in_channels"):
        raise _unsupported(source, "conv_in_channels", adapter["conv_in_channels"], "None (PIA is not supported)")
    if tuple(adapter.get("block_out_channels", (320, 640, 1280, 1280))) != unet_fields["block_out_channels"]:
        raise ValueError(f"{source}: block_out_channels {adapter.get('block_out_channels')} do not match the UNet's "
                         f"{unet_fields['block_out_channels']}")
    levels = len(unet_fields["block_out_channels"])
    unet_layers = unet_fields["layers_per_block"]
    adapter_layers = adapter.get("motion_layers_per_block", 2)
    expand = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * levels  # noqa: E731
    if expand(adapter_layers) != expand(unet_layers):
        raise ValueError(f"{source}: motion_layers_per_block {adapter_layers} does not match the UNet's "
                         f"layers_per_block {unet_layers}")
    if adapter.get("motion_mid_block_layers_per_block", 1) != 1:
        raise _unsupported(source, "motion_mid_block_layers_per_block", adapter["motion_mid_block_layers_per_block"],
                           (1,))
    groups = adapter.get("motion_norm_num_groups", 32)
    if groups != unet_fields["norm_num_groups"]:
        # diffusers' UNetMotionModel builds its motion modules with the UNet's norm_num_groups, ignoring this one
        logger.warning("%s: motion_norm_num_groups %s differs from the UNet's norm_num_groups %s; using the UNet's "
                       "(as diffusers' UNetMotionModel does)", source, groups, unet_fields["norm_num_groups"])
    heads = adapter.get("motion_num_attention_heads", 8)
    return MotionConfig(
        heads=heads if isinstance(heads, int) else tuple(heads),
        layers_per_block=_uniform(adapter.get("motion_transformer_layers_per_block", 1), source,
                                  "motion_transformer_layers_per_block"),
        max_seq_length=int(adapter.get("motion_max_seq_length", 32)),
        use_mid_block=bool(adapter.get("use_motion_mid_block", True)),
        mid_layers_per_block=_uniform(adapter.get("motion_transformer_layers_per_mid_block", 1), source,
                                      "motion_transformer_layers_per_mid_block"),
        norm_over_frames=norm_over_frames)


# ----------------------------------------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict:
    return read_model_config(folder, "a diffusers model folder")


@functools.lru_cache(maxsize=8)
def abstract_variables(config: UNetConfig):
    """The boxed abstract variable tree of ``UNetMotion(config)`` from ``jax.eval_shape`` (no real init; cached per
    config, the tree holds only shapes)."""
    model = UNetMotion(config)
    side = 2 ** (config.levels - 1)
    sample = jnp.zeros((1, 1, side, side, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), context))


def positions_tolerance(dtype) -> float:
    """How far a stored table may be from the float64 formula and still be that formula (storage rounding)."""
    return max(1e-4, 2 * float(jnp.finfo(dtype).eps))


def split_position_tables(state_dict: Mapping[str, np.ndarray], abstract_params, *, source: str,
                          max_seq_length: int | None = None) -> tuple[dict, dict]:
    """Separate ``*.pos_embed.pe`` buffers from a diffusers-keyed state dict and check them.

    Returns (state dict without them, flat ``{module path: table (max_len, C)}`` of tables that differ from the
    formula). A table for a module the model lacks, or with the wrong channel count or length, is a
    ``CheckpointMismatchError``.
    """
    flat_params = traverse_util.flatten_dict(nn.unbox(abstract_params))
    weights, differing, errors = {}, {}, []
    for key, value in state_dict.items():
        if not POSITION_KEY.search(key):
            weights[key] = value
            continue
        module_path, _ = torch_key_to_module_path(key)  # (..., "transformer_blocks_k", "pos_embed"), "pe"
        block_path = module_path[:-1]
        table = np.asarray(value)
        table = table.reshape(table.shape[-2:]) if table.ndim == 3 and table.shape[0] == 1 else table
        channels_key = block_path + ("norm1", "scale")
        if not any(p.startswith("motion_modules") for p in block_path) or channels_key not in flat_params:
            errors.append(f"{key}: no such motion block in the model")
            continue
        channels = flat_params[channels_key].shape[0]
        if table.ndim != 2 or table.shape[1] != channels:
            errors.append(f"{key} {np.shape(value)}: expected (1, max_seq_length, {channels})")
            continue
        if max_seq_length is not None and table.shape[0] != max_seq_length:
            errors.append(f"{key} {np.shape(value)}: the config says max_seq_length {max_seq_length}")
            continue
        formula = sinusoidal_positions(table.shape[0], channels)
        if not np.allclose(table.astype(np.float64), formula, rtol=0, atol=positions_tolerance(table.dtype)):
            differing[block_path] = table.astype(np.float32)
    if errors:
        raise CheckpointMismatchError(f"{source}: positional tables do not match the model:\n    "
                                      + "\n    ".join(errors))
    if differing:
        warnings.warn(f"{source}: {len(differing)} stored motion positional tables differ from the sinusoidal "
                      f"formula (e.g. {'/'.join(next(iter(differing)))}); using the stored tables "
                      f"(variables['{BUFFERS}'])", stacklevel=3)
    return weights, differing


def variables_from_state_dict(config: UNetConfig, state_dict: Mapping[str, np.ndarray], *, source: str) -> dict:
    """``{"params": ...}`` (+ ``"buffers"``) for ``UNetMotion(config)`` from diffusers-keyed tensors."""
    abstract = abstract_variables(config)["params"]
    max_len = config.motion.max_seq_length if config.motion is not None else None
    weights, differing = split_position_tables(state_dict, abstract, source=source, max_seq_length=max_len)
    params = fill_params(abstract, weights, source=source, dtype=np.dtype(config.param_dtype))
    variables = {"params": params}
    if differing:
        variables[BUFFERS] = traverse_util.unflatten_dict({path + ("pos_embed",): t for path, t in differing.items()})
    return variables


def load_unet(unet_folder: str | Path, motion_adapter: str | Path | None = None, *, variant: str | None = None,
              allow_pickle: bool = False, motion_heads: int | None = None, max_seq_length: int | None = None,
              **config_overrides) -> tuple[UNetConfig, dict]:
    """Load ``(UNetConfig, variables)`` for ``UNetMotion``; ``model.apply(variables, ...)``.

    ``motion_adapter``: a diffusers MotionAdapter folder, or a single motion-module file (original AnimateDiff or
    diffusers layout; ``.ckpt`` needs ``allow_pickle=True``). For a single file, which has no config,
    ``motion_heads`` (default 8, as every released AnimateDiff) and, when the file has no positional tables and no
    mid block, ``max_seq_length`` say what the weights cannot. ``config_overrides``: UNetConfig fields (``dtype``,
    ``remat``, ``attention_backend``) and ``norm_over_frames``.
    """
    unet_folder = Path(unet_folder)
    unet_cfg = read_config(unet_folder)
    state = dict(read_model_folder(unet_folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle))
    source = str(unet_folder)
    if motion_adapter is None:
        config = translate_diffusers_config(unet_cfg, source=f"{unet_folder}/config.json", **config_overrides)
    elif Path(motion_adapter).is_dir():
        adapter_folder = Path(motion_adapter)
        adapter_cfg = read_config(adapter_folder)
        config = translate_diffusers_config(unet_cfg, adapter_cfg, source=f"{unet_folder}/config.json",
                                            adapter_source=f"{adapter_folder}/config.json", **config_overrides)
        adapter_state = read_model_folder(adapter_folder, WEIGHTS_NAME, variant=variant, allow_pickle=allow_pickle)
        state = _merge(state, adapter_state, source, str(adapter_folder))
        source = f"{unet_folder} + {adapter_folder}"
    else:
        from jaxvc.convert.animatediff import read_motion_module_file
        motion_file = read_motion_module_file(motion_adapter, allow_pickle=allow_pickle,
                                              max_seq_length=max_seq_length)
        norm_over_frames = config_overrides.pop("norm_over_frames", True)
        config = translate_diffusers_config(unet_cfg, source=f"{unet_folder}/config.json", **config_overrides)
        if config.motion is not None:
            raise ValueError(f"{unet_folder}: this UNetMotionModel already holds motion modules; do not add "
                             f"{motion_adapter}")
        motion = motion_file.motion_config(heads=8 if motion_heads is None else motion_heads,
                                           norm_over_frames=norm_over_frames)
        config = dataclasses.replace(config, motion=motion)
        state = _merge(state, motion_file.state_dict, source, str(motion_adapter))
        source = f"{unet_folder} + {motion_adapter}"
    return config, variables_from_state_dict(config, state, source=source)


def _merge(unet_state: dict, adapter_state: Mapping[str, np.ndarray], unet_source: str, adapter_source: str) -> dict:
    clash = sorted(set(unet_state) & set(adapter_state))
    if clash:
        raise CheckpointMismatchError(f"{adapter_source}: keys already present in {unet_source} "
                                      f"(is the UNet already a UNetMotionModel?): {clash[:5]}")
    return {**unet_state, **adapter_state}
