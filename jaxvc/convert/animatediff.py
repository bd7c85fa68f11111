"""Read one AnimateDiff motion-module file (``mm_sd_v14/v15/v15_v2.ckpt``, ``v3_sd15_mm.ckpt``, or safetensors).

Two key layouts are accepted:
  original (guoyww/AnimateDiff): ``{down_blocks.i|mid_block|up_blocks.i}.motion_modules.j.temporal_transformer.
      {norm, proj_in, proj_out, transformer_blocks.k.{attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0,
      pos_encoder.pe}, norms.{0,1}, ff.net.0.proj, ff.net.2, ff_norm}}`` (28 keys per module, two pe copies);
  diffusers (``MotionAdapter`` state dict): the same without ``temporal_transformer.``, with norm1/norm2/norm3,
      attn1/attn2 and one ``transformer_blocks.k.pos_embed.pe`` per block.
The mapping original -> diffusers is diffusers' own (``convert_animatediff_checkpoint_to_diffusers``):
``norms.0->norm1, norms.1->norm2, ff_norm->norm3, attention_blocks.0->attn1, .1->attn2``, drop
``temporal_transformer.``. The pe copies become the block's ``pos_embed.pe`` (checked later against the formula).

Version (as diffusers' ``infer_diffusers_model_type``): a mid-block motion module -> v2 (max length 32); otherwise
a positional table of length 24 -> v1, else v3 (32). Some upstream revisions stored pe non-persistently, so files may
lack the tables: then v2 is still recognised, and v1 vs v3 needs ``max_seq_length``. ``.ckpt`` files are pickles
and are read only with ``allow_pickle=True`` (by a restricted unpickler; a ``{"state_dict": ...}`` wrapper is
unwrapped).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxvc.convert.state_dict import WeightFileError, read_weight_file
from jaxvc.convert.torch_to_flax import CheckpointMismatchError
from jaxvc.models.unet import MotionConfig, UnsupportedConfigError

ORIGINAL_TO_DIFFUSERS = (
    (r"\.temporal_transformer\.", "."),
    (r"\.norms\.0\.", ".norm1."),
    (r"\.norms\.1\.", ".norm2."),
    (r"\.ff_norm\.", ".norm3."),
    (r"\.attention_blocks\.0\.", ".attn1."),
    (r"\.attention_blocks\.1\.", ".attn2."),
)
_PE_COPY = re.compile(r"^(.*\.transformer_blocks\.\d+)\.attn([12])\.pos_encoder\.pe$")
_MODULE = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.(\d+)\.")
VERSION_MAX_LENGTH = {"v1": 24, "v2": 32, "v3": 32}


@dataclasses.dataclass
class MotionModuleFile:
    """A motion-module file in diffusers keys, with what its weights say about the adapter."""
    path: str
    layout: str                    # "original" or "diffusers"
    version: str                   # "v1", "v2" or "v3"
    state_dict: dict               # diffusers keys, including one ``pos_embed.pe`` per block when the file has them
    max_seq_length: int
    use_mid_block: bool
    transformer_layers: int        # temporal transformer blocks per motion module
    has_position_tables: bool

    def motion_config(self, heads: int = 8, norm_over_frames: bool = True) -> MotionConfig:
        """The MotionConfig of these weights; ``heads`` is not recoverable from the weights (8 in every release)."""
        return MotionConfig(heads=heads, layers_per_block=self.transformer_layers, max_seq_length=self.max_seq_length,
                            use_mid_block=self.use_mid_block, norm_over_frames=norm_over_frames)


def original_to_diffusers(state_dict: Mapping[str, np.ndarray], source: str = "motion module") -> dict:
    """Rename original AnimateDiff keys to diffusers keys; the two pe copies per block become one ``pos_embed.pe``
    (they must be equal: the diffusers structure has one table per block)."""
    rules = [(re.compile(p), r) for p, r in ORIGINAL_TO_DIFFUSERS]
    renamed, tables = {}, {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in rules:
            new_key = pattern.sub(replacement, new_key)
        match = _PE_COPY.match(new_key)
        if match:
            tables.setdefault(match.group(1), {})[match.group(2)] = np.asarray(value)
            continue
        if new_key in renamed:
            raise CheckpointMismatchError(f"{source}: two keys map to '{new_key}' (one is '{key}')")
        renamed[new_key] = value
    for block, copies in tables.items():
        first = copies.get("1", copies.get("2"))
        if "1" in copies and "2" in copies and (copies["1"].shape != copies["2"].shape
                                                or not np.array_equal(copies["1"], copies["2"])):
            raise CheckpointMismatchError(f"{source}: the two positional tables of {block} (attention_blocks.0/1."
                                          "pos_encoder.pe) differ; diffusers' layout has one table per block")
        renamed[f"{block}.pos_embed.pe"] = first
    return renamed


def detect_version(state_dict: Mapping[str, np.ndarray], source: str = "motion module",
                   max_seq_length: int | None = None) -> tuple[str, int]:
    """(version, max_seq_length) from diffusers-keyed motion-module weights (see the module docstring)."""
    if any(k.startswith("controlnet_cond_embedding") for k in state_dict):
        raise UnsupportedConfigError(f"{source}: a SparseCtrl checkpoint (controlnet_cond_embedding.*) is not "
                                     "a motion module jaxvc loads")
    sdxl_key = "up_blocks.2.motion_modules.0.norm.weight"
    if sdxl_key in state_dict and np.shape(state_dict[sdxl_key])[-1] == 320:
        raise UnsupportedConfigError(f"{source}: an SDXL motion module (up_blocks.2 has 320 channels); jaxvc's "
                                     "UNet is SD1.x")
    has_mid = "mid_block.motion_modules.0.norm.bias" in state_dict
    tables = [np.shape(v) for k, v in state_dict.items() if k.endswith(".pos_embed.pe")]
    lengths = {shape[-2] for shape in tables if len(shape) >= 2}
    if len(lengths) > 1:
        raise CheckpointMismatchError(f"{source}: positional tables of different lengths {sorted(lengths)}")
    if lengths:
        stored = lengths.pop()
        if max_seq_length is not None and max_seq_length != stored:
            raise ValueError(f"{source}: max_seq_length {max_seq_length} was given but the file's positional tables "
                             f"have length {stored}")
        return ("v2" if has_mid else "v1" if stored == 24 else "v3"), stored
    if has_mid:
        return "v2", max_seq_length or VERSION_MAX_LENGTH["v2"]
    if max_seq_length is None:
        raise ValueError(f"{source}: no positional tables and no mid-block module, so v1 (24 frames) and v3 (32) "
                         "cannot be told apart; pass max_seq_length")
    return ("v1" if max_seq_length == 24 else "v3"), max_seq_length


def _count(keys, pattern: str) -> int:
    found = {m.group(1) for k in keys for m in [re.match(pattern, k)] if m}
    return len(found)


def motion_module_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "motion module",
                                  max_seq_length: int | None = None) -> MotionModuleFile:
    """Interpret a motion-module state dict in either layout."""
    if not any(_MODULE.match(k) for k in state_dict):
        sample = sorted(state_dict)[:5]
        raise CheckpointMismatchError(f"{source}: no '<block>.motion_modules.<j>.' keys; not an AnimateDiff motion "
                                      f"module (first keys: {sample})")
    layout = "original" if any(".temporal_transformer." in k for k in state_dict) else "diffusers"
    converted = original_to_diffusers(state_dict, source) if layout == "original" else dict(state_dict)
    version, max_len = detect_version(converted, source, max_seq_length)
    layers = _count(converted, r"^down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\.")
    return MotionModuleFile(path=source, layout=layout, version=version, state_dict=converted, max_seq_length=max_len,
                            use_mid_block="mid_block.motion_modules.0.norm.bias" in converted,
                            transformer_layers=max(layers, 1),
                            has_position_tables=any(k.endswith(".pos_embed.pe") for k in converted))


def read_motion_module_file(path: str | Path, *, allow_pickle: bool = False,
                            max_seq_length: int | None = None) -> MotionModuleFile:
    """Read a ``.safetensors`` or (with ``allow_pickle``) ``.ckpt`` motion-module file from disk."""
    path = Path(path)
    if path.is_dir():
        raise WeightFileError(f"{path}: is a folder; a diffusers MotionAdapter folder is loaded by "
                              "jaxvc.convert.unet.load_unet(unet_folder, motion_adapter=folder)")
    return motion_module_from_state_dict(read_weight_file(path, allow_pickle=allow_pickle), str(path), max_seq_length)
