"""``jaxvc export-diffusers RUN OUT``: a training run's UNet as diffusers folders, for PyTorch users.

Writes into the folder OUT:
  unet/               config.json + diffusion_pytorch_model.safetensors: a diffusers ``UNetMotionModel``
                      (``UNetMotionModel.from_pretrained(OUT / "unet")``: no missing or unexpected keys);
  motion_adapter/     the same motion modules as a ``MotionAdapter``, for ``UNetMotionModel.from_unet2d(any SD1.5
                      UNet, adapter)`` or an ``AnimateDiffPipeline``;
  jaxvc_export.json   the run, step, EMA or not, dtype, method, what was left out, how to run the UNet, and the
                      base pipeline used (``"base"``, ``"base_from"``; ``"pipeline"``: true, or false with
                      ``"pipeline_reason"``).
With a base pipeline (``--base FOLDER``, else the run's ``config.model.pretrained`` when that is a diffusers folder
with ``model_index.json``) OUT is also a whole ``AnimateDiffPipeline`` folder: the base's ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` (and ``feature_extractor/``) hard-linked (copied where links fail; the base is never
written to) and a ``model_index.json`` naming the UNet, the motion adapter and those. Every supported method keeps the
VAE frozen and a trained text encoder is refused, so the base's are the run's. A base that is a converted jaxvc
checkpoint or is missing writes the UNet folders only and says why; a ``--base`` that is not a diffusers pipeline
folder is an error.
The weights are the run's parameters as its method uses them: frozen and trained merged (``TrainState.full_params``,
which ``load_trained_run`` returns), the EMA weights where the run keeps them unless ``--no-ema``. Keys and layouts
are the exact inverse of the loader's mechanical mapping (``jaxvc/convert/torch_to_flax.py``, ``unet.py``): loading
the folder back with ``load_unet`` gives the same parameters bit for bit (``tests/test_export_diffusers.py``).
Motion positional tables (``pos_embed.pe``, buffers diffusers saves) are written as jaxvc computes with them: a
stored table from the ``buffers`` collection, else the sinusoidal formula rounded once to float32.

Per method (nothing that changes the UNet's output is dropped silently):
  videomaker        the whole model (no new parameters). PyTorch runs it with jaxvc's PISA processor
                    (``jaxvc.bench.torch_pisa.install_reference_injection(unet, frames + 1)``, the reference latent
                    appended as the last frame); the record says how.
  still_moving      stage "motion": the UNet (the frozen base); the motion adapter is a LoRA: left out and named
                    (``jaxvc export-lora`` writes it; the paper removes it at inference). Stage "spatial": refused,
                    its spatial adapters are output adapters with no diffusers equivalent.
  customcrafter     the UNet (the frozen base); the SSLM LoRA and the learnt token are left out and named
                    (``jaxvc export-lora`` writes both, for ``load_lora_weights`` / ``load_textual_inversion``).
  microcinema       refused: AppearNet and its injection convs drive every block of the UNet; diffusers has none.
  disentangled_s2v  refused: a Wan video DiT, not a UNet (``jaxvc export-lora`` writes its LoRA).
Also refused, naming the setting: a run that trains its text encoder (only the UNet is written), and a UNet with
jaxvc-only features ``UNetMotionModel`` cannot express, e.g. per-frame motion GroupNorm (``norm_over_frames=False``,
the original AnimateDiff's; diffusers normalises across frames) or frame/position/text embeddings of the demo.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from jaxvc.models.unet import UnsupportedConfigError

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
RECORD = "jaxvc_export.json"
DTYPES = ("float32", "float16", "bfloat16")
# what the export does with each method (docstring above); a method not listed has no diffusers UNet export
SUPPORTED = ("videomaker", "still_moving", "customcrafter")
REFUSED = {
    "microcinema": "AppearNet and its injection zero-convs (params appearnet/, injection/) feed every block of the "
                   "UNet and have no diffusers equivalent; a UNet without them computes another function",
    "disentangled_s2v": "a Wan video DiT, not a UNet: there is no UNetMotionModel to write (`jaxvc export-lora` "
                        "writes its LoRA)",
}
# parts beside the UNet that `jaxvc export-lora` writes: left out here and named in the record and on stdout
COVERED_BY_EXPORT_LORA = {
    "adapters/motion": "Still-Moving's motion adapter (a LoRA on the motion modules; the paper removes it at "
                       "inference)",
    "adapters/sslm": "CustomCrafter's SSLM (a LoRA)",
    "new_tokens": "CustomCrafter's learnt token (textual inversion)",
}
BASE_PARTS = ("unet", "text_encoder", "vae")
# what OUT takes from a base pipeline folder (the last: only where the base has it); the run writes unet/ and
# motion_adapter/. AnimateDiffPipeline's optional components the base lacks are [null, null] in model_index.json.
PIPELINE_COPIED = ("vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_OPTIONAL = ("feature_extractor", "image_encoder")
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_BLOCKS = {"CrossAttnDownBlock2D": "CrossAttnDownBlockMotion", "DownBlock2D": "DownBlockMotion",
           "CrossAttnUpBlock2D": "CrossAttnUpBlockMotion", "UpBlock2D": "UpBlockMotion"}


# ---------------------------------------------------------------------------------------------------- configs
def _jaxvc_only(config) -> list[str]:
    """UNetConfig settings whose function diffusers' ``UNetMotionModel`` cannot compute."""
    motion = config.motion
    found = [name for name, bad in (
        ("motion=None (no motion modules)", motion is None),
        ("resnet_time_scale_shift", config.resnet_time_scale_shift != "default"),
        ("addition_embed_type", config.addition_embed_type is not None),
        ("spatial_position_embedding", config.spatial_position_embedding),
        ("reference_time_embedding", config.reference_time_embedding),
        ("spatial_rope_theta", config.spatial_rope_theta is not None),
        # UNetMotionModel's time projection is Timesteps(C, flip_sin_to_cos=True, downscale_freq_shift=0)
        ("flip_sin_to_cos", not config.flip_sin_to_cos), ("freq_shift", config.freq_shift != 0)) if bad]
    if motion is not None:
        found += [f"motion.{name}" for name, bad in (
            ("norm_over_frames=False (per-frame GroupNorm; diffusers normalises across frames)",
             not motion.norm_over_frames),
            ("frame_time_embedding", motion.frame_time_embedding),
            ("text_cross_attention", motion.text_cross_attention),
            ("norm_num_groups", motion.norm_num_groups not in (None, config.norm_num_groups))) if bad]
    return found


def _listed(value):
    return value if isinstance(value, int) else list(value)


def unet_motion_config(config, sample_size: int | list[int] | None = None) -> dict:
    """A ``UNetConfig`` as a diffusers ``UNetMotionModel`` config.json; ``translate_diffusers_config`` of it gives
    the same UNetConfig back (its run-time fields aside: dtype, remat, attention backend). Raises
    ``UnsupportedConfigError`` naming the jaxvc-only settings."""
    unsupported = _jaxvc_only(config)
    if unsupported:
        raise UnsupportedConfigError(f"the UNet uses {', '.join(unsupported)}, which diffusers' UNetMotionModel "
                                     "does not implement")
    motion = config.motion
    transformer_layers = config.per_level("transformer_layers_per_block")
    return {
        "_class_name": "UNetMotionModel", "sample_size": sample_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "down_block_types": [_BLOCKS[t] for t in config.down_block_types],
        "up_block_types": [_BLOCKS[t] for t in config.up_block_types],
        "block_out_channels": list(config.block_out_channels), "layers_per_block": _listed(config.layers_per_block),
        "downsample_padding": config.downsample_padding, "mid_block_scale_factor": config.mid_block_scale_factor,
        "act_fn": "silu", "norm_num_groups": config.norm_num_groups, "norm_eps": config.norm_eps,
        "cross_attention_dim": config.cross_attention_dim,
        "transformer_layers_per_block": _listed(config.transformer_layers_per_block),
        "transformer_layers_per_mid_block": transformer_layers[-1],  # jaxvc's mid block: the last level's count
        "temporal_transformer_layers_per_block": motion.layers_per_block,
        "temporal_transformer_layers_per_mid_block": motion.mid_layers_per_block,
        "use_linear_projection": config.use_linear_projection, "num_attention_heads": _listed(config.attention_heads),
        "motion_max_seq_length": motion.max_seq_length, "motion_num_attention_heads": _listed(motion.heads),
        "use_motion_mid_block": motion.use_mid_block, "mid_block_layers": 1}


def motion_adapter_config(config) -> dict:
    """The motion modules of ``config`` as a diffusers ``MotionAdapter`` config.json (``_motion_from_adapter``
    reads it back into the same MotionConfig)."""
    unet = unet_motion_config(config)
    return {"_class_name": "MotionAdapter", "block_out_channels": unet["block_out_channels"],
            "motion_layers_per_block": unet["layers_per_block"],
            "motion_transformer_layers_per_block": unet["temporal_transformer_layers_per_block"],
            "motion_mid_block_layers_per_block": 1,
            "motion_transformer_layers_per_mid_block": unet["temporal_transformer_layers_per_mid_block"],
            "motion_num_attention_heads": unet["motion_num_attention_heads"],
            "motion_norm_num_groups": config.norm_num_groups,  # what UNetMotionModel builds its modules with
            "motion_max_seq_length": unet["motion_max_seq_length"],
            "use_motion_mid_block": unet["use_motion_mid_block"], "conv_in_channels": None}


# ---------------------------------------------------------------------------------------------------- weights
def torch_key(module_path: tuple[str, ...], leaf: str) -> str:
    """A Flax module path + torch leaf -> its diffusers key (``down_blocks_0/.../to_out_0``, ``weight`` ->
    ``down_blocks.0....to_out.0.weight``), checked against the loader's own mapping."""
    from jaxvc.convert.lora import torch_module_name  # module lists: the names torch indexes (``resnets.1``)
    from jaxvc.convert.torch_to_flax import torch_key_to_module_path

    key = f"{torch_module_name('unet', module_path)}.{leaf}"
    if torch_key_to_module_path(key) != (tuple(module_path), leaf):
        raise ValueError(f"{'/'.join(module_path)}: {key} would be read elsewhere by the loader")
    return key


def _torch_layout(path: tuple[str, ...], value: np.ndarray, use_linear_projection: bool) -> np.ndarray:
    """Inverse of ``_to_flax_layout``: Dense (in, out) -> (out, in); Conv (*window, I, O) -> (O, I, *window). The
    spatial transformers' proj_in/proj_out are 1x1 convs in diffusers exactly when ``use_linear_projection`` is
    False, and jaxvc builds them as diffusers does (``transformer2d.py``): their rank must say so."""
    if path[-1] != "kernel":
        return value
    spatial_projection = path[-2] in ("proj_in", "proj_out") and not any(p.startswith("motion_modules_")
                                                                         for p in path)
    if spatial_projection and value.ndim != (2 if use_linear_projection else 4):
        raise ValueError(f"{'/'.join(path)} {value.shape}: use_linear_projection={use_linear_projection} needs a "
                         f"{'linear' if use_linear_projection else '1x1 conv'} layer")
    if value.ndim == 2:
        return value.T
    return np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))


def unet_state_dict(config, variables) -> dict[str, np.ndarray]:
    """``UNetMotion`` variables (``{"params": ...}`` and maybe ``"buffers"``) -> the diffusers ``UNetMotionModel``
    state dict (host numpy arrays in the parameters' dtype; positional tables float32)."""
    import jax
    from flax import traverse_util

    from jaxvc.models.embeddings import sinusoidal_positions
    from jaxvc.models.motion import BUFFERS

    params = traverse_util.flatten_dict(jax.device_get(dict(variables["params"])))
    unknown = sorted("/".join(path) for path in params if path[-1] not in _LEAVES)
    if unknown:
        raise ValueError(f"parameters diffusers has no name for: {unknown[:5]}")
    state = {torch_key(path[:-1], _LEAVES[path[-1]]): np.ascontiguousarray(
        _torch_layout(path, np.asarray(value), config.use_linear_projection)) for path, value in params.items()}
    tables = traverse_util.flatten_dict(jax.device_get(dict(variables.get(BUFFERS, {}))))
    for path, value in params.items():  # one table per temporal block: (1, max_seq_length, C) as diffusers keeps it
        block = path[:-2]
        if path[-2:] == ("norm1", "scale") and any(p.startswith("motion_modules_") for p in block):
            stored = tables.get(block + ("pos_embed",))
            table = sinusoidal_positions(config.motion.max_seq_length, value.shape[0]) if stored is None else stored
            state[torch_key(block + ("pos_embed",), "pe")] = np.ascontiguousarray(
                np.asarray(table, np.float32)[None])
    return state


# ---------------------------------------------------------------------------------------------------- the run
def left_out_parts(method, params) -> list[str]:
    """The parts of the method's model this export leaves out (``export-lora``'s), each named with what it is;
    a ``ValueError`` for a method or part without a diffusers UNet equivalent."""
    name = getattr(method, "name", type(method).__name__)
    if name in REFUSED:
        raise ValueError(f"method '{name}': {REFUSED[name]}")
    if name not in SUPPORTED:
        raise ValueError(f"method '{name}' has no diffusers UNetMotionModel export (supported: "
                         f"{', '.join(SUPPORTED)})")
    if getattr(method.options, "train_text_encoder", False):
        raise ValueError(f"method '{name}': the run trains its text encoder (train_text_encoder=True), and this "
                         "export writes the UNet only")
    parts = []  # beside the UNet, text encoder and VAE: each adapter, each method-specific part
    for part, tree in params["params"].items():
        if part not in BASE_PARTS:
            parts += [f"adapters/{sub}" for sub in tree] if part == "adapters" else [part]
    refused = sorted(p for p in parts if p not in COVERED_BY_EXPORT_LORA)
    if refused:
        raise ValueError(f"method '{name}': {', '.join(refused)} change the UNet's output and have no diffusers "
                         "equivalent (output adapters, method-specific networks)")
    return [f"{part}: {COVERED_BY_EXPORT_LORA[part]}" for part in sorted(parts)]


def _usage(method, frames: int) -> dict:
    if method.name == "videomaker":
        cross = method.options.reference_cross_attention
        return {"frames": frames, "frames_with_reference": frames + 1, "reference_cross_attention": cross,
                "pytorch": "unet = UNetMotionModel.from_pretrained(OUT/unet); jaxvc.bench.torch_pisa."
                           f"install_reference_injection(unet, {frames + 1}, reference_cross_attention={cross}); "
                           "sample (B, C, F+1, h, w) = the video latents with the reference latent appended as the "
                           "last frame (a zero latent in the unconditional branch), encoder_hidden_states repeated "
                           "per frame (B*(F+1), L, D); drop the last output frame"}
    return {"frames": frames, "pytorch": "AnimateDiffPipeline(unet=UNetMotionModel.from_pretrained(OUT/unet), ...) "
                                         "or MotionAdapter.from_pretrained(OUT/motion_adapter); the LoRA from "
                                         "`jaxvc export-lora` with load_lora_weights"}


# ---------------------------------------------------------------------------------------------------- the pipeline
def _base_index(folder: Path, config) -> dict:
    """The base folder's model_index.json, checked to hold the parts OUT takes and to match the run's UNet;
    ``ValueError`` naming what is wrong."""
    from jaxvc.convert.orbax_io import INDEX_NAME

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        what = "a converted jaxvc checkpoint" if (folder / INDEX_NAME).is_file() else (
            "missing" if not folder.exists() else "not a diffusers pipeline folder")
        raise ValueError(f"base {folder}: {what} (no model_index.json)")
    index = json.loads(index_file.read_text())
    missing = [name for name in PIPELINE_COPIED
               if not (isinstance(index.get(name), list) and index[name][0] and (folder / name).is_dir())]
    if missing:
        raise ValueError(f"base {folder}: no {', '.join(f'{name}/' for name in missing)} in model_index.json")
    vae, text = ({} if not (folder / name / "config.json").is_file() else
                 json.loads((folder / name / "config.json").read_text()) for name in ("vae", "text_encoder"))
    if (vae.get("latent_channels"), text.get("hidden_size")) != (config.in_channels, config.cross_attention_dim):
        raise ValueError(f"base {folder}: its VAE's {vae.get('latent_channels')} latent channels and text encoder's "
                         f"{text.get('hidden_size')} features are not the run's UNet's {config.in_channels} and "
                         f"{config.cross_attention_dim}")
    return index


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)


def write_pipeline(base: Path, index: dict, out: Path) -> Path:
    """The base's components into ``out`` (hard links, else copies; an earlier export's replaced, never written
    through) and ``out/model_index.json`` for an ``AnimateDiffPipeline`` of them + ``unet/`` + ``motion_adapter/``."""
    from jaxvc.convert.orbax_io import write_json_atomic

    pipeline = {"_class_name": "AnimateDiffPipeline", "_diffusers_version": index.get("_diffusers_version", "0.42.1"),
                "unet": ["diffusers", "UNetMotionModel"], "motion_adapter": ["diffusers", "MotionAdapter"]}
    for name in PIPELINE_COPIED + PIPELINE_OPTIONAL:
        present = name in PIPELINE_COPIED or (name == "feature_extractor" and isinstance(index.get(name), list)
                                              and index[name][0] and (base / name).is_dir())
        pipeline[name] = list(index[name]) if present else [None, None]
        if (out / name).exists():  # hard links to a base's files: unlinked, the base is untouched
            shutil.rmtree(out / name)
        if present:
            shutil.copytree(base / name, out / name, copy_function=_link_or_copy)
    write_json_atomic(out / "model_index.json", pipeline)
    return out / "model_index.json"


def _resolve_base(run, base: str | os.PathLike | None) -> tuple[Path | None, dict | None, str | None]:
    """(base folder, its model_index.json, None) or (folder or None, None, why there is no pipeline). An explicit
    ``base`` that is not usable raises ``ValueError``; the run's ``config.model.pretrained`` only says why."""
    config = run.method.unet.config
    if base is not None:
        if run.method.vae is None:
            raise ValueError(f"base {base}: the run is a pixel-space model (no VAE); it makes no latent pipeline")
        return Path(base), _base_index(Path(base), config), None
    model = run.config.get("model") if getattr(run, "config", None) is not None else None
    pretrained = (model.get("pretrained") if model is not None else None) or None
    if pretrained is None:
        return None, None, "the run has no config.model.pretrained and no --base was given"
    try:
        return Path(pretrained), _base_index(Path(pretrained), config), None
    except ValueError as error:
        return Path(pretrained), None, f"{error} (give --base PIPELINE_FOLDER)"


def export(run, out: str | os.PathLike, *, dtype: str = "float32", run_dir: str | None = None,
           base: str | os.PathLike | None = None) -> dict:
    """Write a loaded ``TrainedRun``'s UNet into ``out`` (``unet/``, ``motion_adapter/``, the record) and, with a base
    pipeline (``base``, else the run's ``config.model.pretrained``), the rest of an ``AnimateDiffPipeline`` folder;
    returns the folders written, the parts left out (``"left_out"``) and ``"pipeline"`` (model_index.json or
    None, then ``"pipeline_reason"``). ``ValueError`` for what cannot be exported."""
    import jax.numpy as jnp

    from jaxvc.convert.orbax_io import write_json_atomic, write_safetensors_atomic

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    method = run.method
    left_out = left_out_parts(method, run.params)
    config = method.unet.config
    base_folder, base_index, no_pipeline = _resolve_base(run, base)
    if base_folder is not None and Path(out).resolve() == base_folder.resolve():
        raise ValueError(f"{out}: is the base pipeline folder; the export writes a new folder beside it")
    height, width = method.latent_frame_size
    unet_config = unet_motion_config(config, sample_size=height if height == width else [height, width])
    state = unet_state_dict(config, {"params": run.params["params"]["unet"]})
    stored = jnp.dtype(dtype)  # bfloat16: ml_dtypes', which safetensors writes as BF16
    state = {k: v.astype(stored) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V" else v
             for k, v in state.items()}
    out = Path(out)
    folders = {"unet": out / "unet", "motion_adapter": out / "motion_adapter"}
    write_safetensors_atomic(folders["unet"] / WEIGHTS_FILE, state, {"format": "pt"})
    write_json_atomic(folders["unet"] / "config.json", unet_config)
    write_safetensors_atomic(folders["motion_adapter"] / WEIGHTS_FILE,
                             {k: v for k, v in state.items() if "motion_modules." in k}, {"format": "pt"})
    write_json_atomic(folders["motion_adapter"] / "config.json", motion_adapter_config(config))
    record = {"run": None if run_dir is None else str(run_dir), "step": int(run.step), "ema": bool(run.used_ema),
              "dtype": dtype, "method": method.name, "unet": "unet", "motion_adapter": "motion_adapter",
              "left_out": left_out, "latent_channels": config.in_channels,
              "pixel_patch": getattr(method, "pixel_patch", 1) if method.vae is None else None,
              "scheduler": method.scheduler_config(), **_usage(method, method.sample_frames),
              "base": None if base_folder is None else str(base_folder),
              "base_from": None if base_folder is None else "--base" if base is not None else "config.model.pretrained",
              "pipeline": base_index is not None}
    if base_index is not None:
        pipeline = write_pipeline(base_folder, base_index, out)
    else:
        pipeline, record["pipeline_reason"] = None, no_pipeline
        (out / "model_index.json").unlink(missing_ok=True)  # an earlier export's: OUT is no pipeline now
    write_json_atomic(out / RECORD, record)
    return {**folders, "record": out / RECORD, "left_out": left_out, "pipeline": pipeline,
            "pipeline_reason": no_pipeline}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxvc.convert.export_lora import add_arguments as add_run_arguments  # RUN OUT --step --no-ema

    add_run_arguments(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the stored dtype of the weights")
    parser.add_argument("--base", default=None,
                        help="a diffusers SD1.5/AnimateDiff pipeline folder whose VAE, text encoder, tokenizer and "
                             "scheduler make OUT a whole AnimateDiffPipeline (default: the run's "
                             "config.model.pretrained when that is one)")


def run(args) -> int:
    from jaxvc.train.trained_run import RunFolderError, load_trained_run

    try:
        trained = load_trained_run(args.run, step=args.step, use_ema=not args.no_ema)
        written = export(trained, args.out, dtype=args.dtype, run_dir=args.run, base=args.base)
    except (RunFolderError, ValueError) as error:
        print(f"jaxvc export-diffusers: {error}", file=sys.stderr)
        return 2
    for kind in ("unet", "motion_adapter", "record"):
        print(f"  {kind}: {written[kind]}")
    if written["pipeline"] is not None:
        print(f"  pipeline: {written['pipeline']} (AnimateDiffPipeline.from_pretrained(\"{args.out}\"))")
    else:
        print(f"  no pipeline folder, the UNet folders only: {written['pipeline_reason']}")
    for part in written["left_out"]:
        print(f"  not exported ({part}; `jaxvc export-lora` writes it)")
    return 0
