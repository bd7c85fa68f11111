"""LoRA files in the formats users have, read into jaxvc adapter trees, and jaxvc adapters written for diffusers.

Read (``read_lora``), for the UNet, the CLIP text encoder and the Wan DiT (``transformer.<module>``):
  * diffusers / peft: ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) and ``lora_B.weight`` (out, r[, 1, 1]), with
    or without the ``unet.`` / ``text_encoder.`` prefix (a bare file is the UNet's), an adapter name
    (``lora_A.default.weight``) or peft's ``base_model.model.`` prefix; alpha from the safetensors metadata diffusers
    writes (``lora_adapter_metadata``: ``unet.lora_alpha``, ``unet.r``, ``unet.alpha_pattern``), from a peft folder's
    ``adapter_config.json``, else alpha = rank;
  * diffusers' older forms: ``<module>.lora.down.weight`` / ``.lora.up.weight`` and attention processors
    (``attn1.processor.to_q_lora.down.weight``);
  * kohya / A1111 (``lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha``), the format of most SD1.5 LoRAs: the underscored name is matched against the model's own module
    paths.
Each site's ``alpha / rank`` is folded into its ``up`` factor, so a loaded LoRA is an adapter of scaling 1 whose
user-facing ``scale`` means what diffusers' ``cross_attention_kwargs={"scale": ...}`` means.

Write (``save_lora``): an input adapter as a diffusers LoRA file (``unet.<module>.lora_A.weight`` + metadata), which
``pipe.load_lora_weights`` loads, so adapters trained here (CustomCrafter, Still-Moving's motion adapter) go back to
PyTorch users.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxvc.convert.state_dict import WeightFileError, read_weight_file
from jaxvc.convert.torch_to_flax import torch_key_to_module_path
from jaxvc.models.lora import AdapterSpec, AppliedAdapter, adapter_sites

COMPONENTS = ("unet", "text_encoder", "transformer")  # transformer: the Wan DiT
# module-name prefixes of each component inside the torch models (stripped before matching jaxvc paths)
_TORCH_PREFIX = {"unet": "", "text_encoder": "text_model.", "transformer": ""}
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# torch ModuleList attributes: their numeric children are joined to the name in jaxvc paths (``resnets_0``)
_MODULE_LISTS = frozenset({"attentions", "blocks", "down_blocks", "downsamplers", "layers", "motion_modules", "net",
                           "resnets", "to_out", "transformer_blocks", "up_blocks", "upsamplers", "attention_blocks"})
_UNSUPPORTED = ("lora_magnitude_vector", "dora_scale", "hada_", "lokr_", ".diff", "oft_")
_OLD_FORMS = ((re.compile(r"\.processor\.(to_[qkv])_lora\.(down|up)\.weight$"), r".\1.lora.\2.weight"),
              (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora.\1.weight"))


class LoraFileError(WeightFileError):
    """A LoRA file this model cannot take: unknown format, modules the model lacks, shapes that do not fit."""


@dataclasses.dataclass
class LoadedLora:
    """Adapters read from one file, per component (``"unet"``, ``"text_encoder"``), ready to apply or merge."""
    source: str
    adapters: dict[str, AppliedAdapter]
    format: str

    def scaled(self, scale: float) -> "LoadedLora":
        return LoadedLora(self.source, {name: dataclasses.replace(a, scale=float(scale))
                                        for name, a in self.adapters.items()}, self.format)


def _metadata(path: Path) -> dict:
    """diffusers' ``lora_adapter_metadata`` (a JSON string in the safetensors header), or {}."""
    if path.suffix != ".safetensors":
        return {}
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    raw = (header.get("__metadata__") or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _locate(path: str | os.PathLike) -> tuple[Path, dict]:
    """(weight file, peft adapter_config or {}) for a file or a folder of diffusers / peft LoRA weights."""
    path = Path(path)
    if path.is_dir():
        config = {}
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                     "adapter_model.bin"):
            if (path / name).is_file():
                return path / name, config
        raise LoraFileError(f"{path}: no pytorch_lora_weights.safetensors or adapter_model.safetensors in the folder")
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file")
    return path, {}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (component, torch module name, "A" | "B" | "alpha"), or None when it is not a LoRA key."""
    for prefix, component in _KOHYA_PREFIX.items():
        if key.startswith(prefix):
            module, _, leaf = key[len(prefix):].partition(".")
            kind = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(leaf)
            return None if kind is None else (component, "kohya:" + module, kind)
    for pattern, replacement in _OLD_FORMS:
        key = pattern.sub(replacement, key)
    key = key.removeprefix("base_model.model.")
    component = "unet"
    for name in COMPONENTS:
        if key.startswith(name + "."):
            component, key = name, key[len(name) + 1:]
    match = re.match(r"^(.*)\.(lora_A|lora_B|lora\.down|lora\.up)(\.[A-Za-z0-9_-]+)?\.weight$", key)
    if match is None:
        return None
    kind = "A" if match.group(2) in ("lora_A", "lora.down") else "B"
    return component, match.group(1), kind


def _jaxvc_path(component: str, module: str, kernels: Mapping[tuple, tuple], underscored: Mapping[str, tuple],
                source: str) -> tuple:
    """The jaxvc module path of a torch module name (dotted, or kohya's underscored ``kohya:`` form); ``kernels``:
    ``{module path: kernel shape}`` of the component, ``underscored``: ``{"_".join(path): path}`` of the same."""
    if module.startswith("kohya:"):
        name = module[len("kohya:"):]
        path = underscored.get(name.removeprefix("text_model_") if component == "text_encoder" else name)
    else:
        path, _ = torch_key_to_module_path(module.removeprefix(_TORCH_PREFIX[component]) + ".weight")
        path = path if path in kernels else None
    if path is None:
        raise LoraFileError(f"{source}: LoRA for {component} module '{module.removeprefix('kohya:')}', which this "
                            f"model does not have (is the file for another base model, e.g. SDXL?)")
    return path


def _kernel_shapes(params: Mapping) -> dict[tuple, tuple]:
    """``{module path: kernel shape}`` of the modules with a kernel (Dense and Conv layers)."""
    return {tuple(p[:-1]): tuple(v.shape) for p, v in traverse_util.flatten_dict(nn.unbox(dict(params))).items()
            if p[-1] == "kernel"}


def _to_factors(down: np.ndarray, up: np.ndarray, kernel_shape: tuple, key: str) -> tuple[np.ndarray, np.ndarray]:
    """torch lora_A (r, in[, *window]) / lora_B (out, r[, 1, ..., 1]) -> jaxvc down (*window, in, r) / up (r, out)."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    if up.ndim > 2:  # a convolution's: (out, r, 1, ..., 1)
        if any(size != 1 for size in up.shape[2:]):
            raise LoraFileError(f"{key}: lora_B {up.shape} is not a 1x1 convolution")
        up = up.reshape(up.shape[:2])
    rank = down.shape[0]
    if up.ndim != 2 or up.shape[1] != rank:
        raise LoraFileError(f"{key}: lora_A {down.shape} and lora_B {up.shape} do not share a rank")
    if down.ndim == 4 and len(kernel_shape) == 2:  # a 1x1 conv LoRA on a layer jaxvc runs as a linear one
        if down.shape[2:] != (1, 1):
            raise LoraFileError(f"{key}: a {down.shape[2:]} conv LoRA on a linear layer")
        down = down[:, :, 0, 0]
    down = down.T if down.ndim == 2 else np.transpose(down, (*range(2, down.ndim), 1, 0))
    want = (*kernel_shape[:-1], rank), (rank, kernel_shape[-1])
    if down.ndim == 2 and len(kernel_shape) == 4 and kernel_shape[:2] == (1, 1):
        down = down[None, None]
    if (down.shape, up.T.shape) != want:
        raise LoraFileError(f"{key}: factors {down.shape} x {up.T.shape} do not fit the layer's kernel {kernel_shape} "
                            f"(expected {want[0]} x {want[1]})")
    return down, up.T


def read_lora(path: str | os.PathLike, models: Mapping[str, Mapping], *, allow_pickle: bool = False,
              scale: float = 1.0) -> LoadedLora:
    """Read a LoRA file (or diffusers / peft folder) for the components in ``models`` (``{"unet": unet params,
    "text_encoder": text encoder params}``: parameter trees, to match names and shapes against). A LoRA for a
    component not given, a module the model lacks or a shape that does not fit raises ``LoraFileError``."""
    file, peft_config = _locate(path)
    source = str(file)
    state = read_weight_file(file, allow_pickle=allow_pickle)
    metadata = _metadata(file)
    bad = sorted(k for k in state if any(token in k for token in _UNSUPPORTED))
    if bad:
        raise LoraFileError(f"{source}: {bad[0]} ... is not plain LoRA (DoRA / LoHa / LoKr / OFT are not supported)")
    parts: dict[tuple[str, str], dict] = {}
    unknown = []
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        component, module, kind = split
        parts.setdefault((component, module), {})[kind] = (key, value)
    if unknown:
        raise LoraFileError(f"{source}: {len(unknown)} keys are not LoRA factors of a known format, e.g. "
                            f"{unknown[:3]}")
    if not parts:
        raise LoraFileError(f"{source}: no LoRA factors in the file")
    fmt = "kohya" if any(m.startswith("kohya:") for _, m in parts) else "diffusers"
    kernels = {name: _kernel_shapes(params) for name, params in models.items()}
    underscored = {name: {"_".join(path): path for path in shapes} for name, shapes in kernels.items()}
    flat: dict[str, dict] = {}
    for (component, module), factors in sorted(parts.items()):
        if component not in models:
            raise LoraFileError(f"{source}: holds a LoRA for the {component}, which was not given")
        if set(factors) - {"alpha"} != {"A", "B"}:
            raise LoraFileError(f"{source}: module '{module}' has {sorted(factors)}; expected both LoRA factors")
        site = _jaxvc_path(component, module, kernels[component], underscored[component], source)
        (key_a, down), (_, up) = factors["A"], factors["B"]
        down, up = _to_factors(down, up, kernels[component][site], key_a)
        rank = down.shape[-1]
        alpha = _alpha(component, module, rank, factors, metadata, peft_config)
        flat.setdefault(component, {})[site + ("down",)] = down
        flat[component][site + ("up",)] = up * np.float32(alpha / rank)
    adapters = {}
    for component, leaves in flat.items():
        tree = traverse_util.unflatten_dict(leaves)
        rank = max(pair["down"].shape[-1] for pair in adapter_sites(tree).values())
        spec = AdapterSpec(include=(".*",), rank=rank, alpha=rank, placement="input")
        adapters[component] = AppliedAdapter(spec, tree, float(scale))
    return LoadedLora(source, adapters, fmt)


def _alpha(component: str, module: str, rank: int, factors: dict, metadata: dict, peft_config: dict) -> float:
    if "alpha" in factors:  # kohya: per module
        return float(np.asarray(factors["alpha"][1]).reshape(()))
    config = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")} or peft_config
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            return float(value)
    return float(config.get("lora_alpha", rank) or rank)


def save_lora(path: str | os.PathLike, adapters: Mapping[str, AppliedAdapter]) -> Path:
    """Write input adapters ``{"unet": ..., "text_encoder": ...}`` as one diffusers LoRA safetensors file (atomic:
    written beside the target, then renamed). Alpha and rank go into diffusers' ``lora_adapter_metadata``."""
    from jaxvc.convert.orbax_io import write_safetensors_atomic

    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, object] = {}
    for component, adapter in adapters.items():
        if component not in COMPONENTS:
            raise ValueError(f"save_lora: unknown component {component!r}; expected one of {COMPONENTS}")
        if adapter.spec.placement != "input":
            raise ValueError(f"save_lora: the {component} adapter is an output adapter; diffusers LoRA files hold "
                             "input (LoRA) adapters only")
        modules = []
        for site, pair in sorted(adapter_sites(adapter.tree).items()):
            name = torch_module_name(component, site)
            modules.append(name)  # full names: peft targets exactly these modules, not every "to_q"
            down = np.asarray(pair["down"], np.float32)
            up = np.asarray(pair["up"], np.float32) * np.float32(adapter.scale)
            if down.ndim == 2:
                tensors[f"{component}.{name}.lora_A.weight"] = np.ascontiguousarray(down.T)
                tensors[f"{component}.{name}.lora_B.weight"] = np.ascontiguousarray(up.T)
            else:  # conv: (*window, in, r) -> (r, in, *window); up -> (out, r, 1, ..., 1)
                tensors[f"{component}.{name}.lora_A.weight"] = np.ascontiguousarray(
                    np.transpose(down, (down.ndim - 1, down.ndim - 2, *range(down.ndim - 2))))
                tensors[f"{component}.{name}.lora_B.weight"] = np.ascontiguousarray(
                    up.T.reshape(*up.T.shape, *(1,) * (down.ndim - 2)))
        metadata.update({f"{component}.r": int(adapter.spec.rank), f"{component}.lora_alpha":
                         float(adapter.spec.alpha if adapter.spec.alpha is not None else adapter.spec.rank),
                         f"{component}.target_modules": sorted(set(modules))})
    return write_safetensors_atomic(path, tensors, {"format": "pt", "lora_adapter_metadata":
                                                    json.dumps(metadata, indent=2, sort_keys=True)})


def torch_module_name(component: str, site: tuple) -> str:
    """jaxvc module path -> torch module name: ``down_blocks_0`` -> ``down_blocks.0`` for torch's module lists (a
    name such as ``time_embedding/linear_1`` is one torch attribute and stays)."""
    parts = []
    for name in site:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        parts.extend([match.group(1), match.group(2)] if match and match.group(1) in _MODULE_LISTS else [name])
    return _TORCH_PREFIX[component] + ".".join(parts)
