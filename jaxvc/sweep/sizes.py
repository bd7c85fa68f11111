"""The model-size axis of a sweep (``--grid model=xs,s,m``): a table of UNet widths.

The tiny/small rows scale the config's own UNet widths (``block_out_channels``, from ``config.model.unet_overrides``
or the named ``config.model.unet_variant``) by a multiplier, keeping its topology (levels, layers, block types), so
a ``configs/videomaker.py:demo`` sweep is a family of the demo model (for the toy denoiser, ``configs/toy.py``, the
rows scale ``model.features``). Widths are rounded to a multiple of the
GroupNorm group count (the norm needs it) and are at least one group. The ``sd15`` row is Stable Diffusion 1.5's
UNet itself (``configs/videomaker.py:sd15`` on a pod; it replaces the width overrides).
"""
from __future__ import annotations

from ml_collections import ConfigDict

# name -> width multiplier of the config's block_out_channels ("s" = the config's own size).
WIDTH_MULTIPLIERS: dict[str, float] = {"xxs": 0.25, "xs": 0.5, "s": 1.0, "m": 2.0, "l": 4.0, "xl": 8.0}
# name -> the UNet variant it switches to (jaxvc/models/unet.py VARIANTS), width overrides dropped.
NAMED_UNETS: dict[str, str] = {"sd15": "sd15"}
SIZE_NAMES = (*WIDTH_MULTIPLIERS, *NAMED_UNETS)
WIDTH_FIELDS = ("block_out_channels", "norm_num_groups", "attention_heads")


def unet_field(config, name: str):
    overrides = config.model.get("unet_overrides") or {}
    if name in overrides:
        return overrides[name]
    from jaxvc.models.unet import VARIANTS

    variant = config.model.unet_variant
    if variant not in VARIANTS:
        raise ValueError(f"model size: config.model.unet_variant '{variant}' is not one of {sorted(VARIANTS)}")
    return VARIANTS[variant][name]


def scaled_widths(widths, multiplier: float, groups: int) -> tuple[int, ...]:
    """``widths * multiplier`` rounded to multiples of ``groups`` (at least ``groups``)."""
    return tuple(max(groups, int(round(w * multiplier / groups)) * groups) for w in widths)


def apply_size(config: ConfigDict, name: str) -> ConfigDict:
    """Set the UNet of ``config`` to the size ``name`` (in place; returns ``config``)."""
    if name in NAMED_UNETS:
        config.model.unet_variant = NAMED_UNETS[name]
        kept = {k: v for k, v in (config.model.get("unet_overrides") or ConfigDict()).to_dict().items()
                if k not in WIDTH_FIELDS and k not in ("down_block_types", "up_block_types", "layers_per_block")}
        config.model.unet_overrides = ConfigDict(kept)
        return config
    if name not in WIDTH_MULTIPLIERS:
        raise ValueError(f"model size '{name}' is not in the size table ({', '.join(SIZE_NAMES)}); "
                         f"see jaxvc/sweep/sizes.py")
    multiplier = WIDTH_MULTIPLIERS[name]
    if "unet_variant" not in config.model and "features" in config.model:
        # the toy denoiser (configs/toy.py): one width, GroupNorm over model.groups groups
        groups = int(config.model.get("groups", 1))
        config.model.features = scaled_widths((config.model.features,), multiplier, groups)[0]
        return config
    groups = int(unet_field(config, "norm_num_groups"))
    widths = scaled_widths(unet_field(config, "block_out_channels"), multiplier, groups)
    if "unet_overrides" not in config.model or config.model.unet_overrides is None:
        config.model.unet_overrides = ConfigDict()
    config.model.unet_overrides.block_out_channels = widths
    return config


def size_table(config: ConfigDict) -> list[tuple[str, str]]:
    """(name, what it sets) for every row, for ``--dry-run`` and the docs."""
    rows = []
    if "unet_variant" not in config.model and "features" in config.model:
        groups, base, field = int(config.model.get("groups", 1)), (config.model.features,), "model.features"
    else:
        groups, base, field = (int(unet_field(config, "norm_num_groups")), unet_field(config, "block_out_channels"),
                               "block_out_channels")
    for name, multiplier in WIDTH_MULTIPLIERS.items():
        widths = scaled_widths(base, multiplier, groups)
        rows.append((name, f"{field}={widths if len(widths) > 1 else widths[0]} (x{multiplier:g})"))
    for name, variant in NAMED_UNETS.items():
        rows.append((name, f"unet_variant={variant}"))
    return rows
