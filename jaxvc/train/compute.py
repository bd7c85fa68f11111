"""Config names -> compute settings: the compute dtype and the activation rematerialization policy.

Models take ``dtype`` and a remat policy name as plain fields, and call ``remat(ModuleClass, policy)`` on the blocks
they want recomputed in the backward pass; this file is the one place that says what the names mean.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16,
}

# Policy name -> what jax.checkpoint may keep from the forward pass ("full" keeps nothing but the block inputs).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute everything inside the block
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
NO_REMAT = ("none", "", None)


def compute_dtype(name: str | Any) -> Any:
    """``"bfloat16"`` -> ``jnp.bfloat16`` (a dtype passes through)."""
    if not isinstance(name, str):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"compute_dtype '{name}' is not one of {sorted(DTYPES)}") from None


def frozen_dtype(name: str | None) -> Any | None:
    """``config.frozen_dtype`` -> the dtype the train state stores frozen matrices in (``jaxvc/train/state.py``,
    ``jaxvc/models/weight_storage.py``); ``""`` or ``None``: as loaded or initialized (float32)."""
    if name in ("", None):
        return None
    try:
        return compute_dtype(name)
    except ValueError:
        raise ValueError(f"config.frozen_dtype = {name!r}: expected '' (keep float32) or one of {sorted(DTYPES)}") \
            from None


def remat_policy(name: str | bool | None) -> tuple[bool, Callable | None]:
    """``(enabled, policy)`` for a config name: none | full | nothing_saveable | dots_saveable | ...
    (``True`` / ``False`` mean "full" / "none", as model configs that only say whether to remat do)."""
    if name is True:
        name = "full"
    if name is False or name in NO_REMAT or (isinstance(name, str) and name.lower() == "none"):
        return False, None
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy '{name}' is not one of {['none', *REMAT_POLICIES]}")
    return True, REMAT_POLICIES[name]


def remat(module_cls: type[nn.Module], policy_name: str | bool | None, **remat_kwargs) -> type[nn.Module]:
    """``nn.remat(module_cls, policy=...)`` for the named policy, or ``module_cls`` itself for ``"none"``."""
    enabled, policy = remat_policy(policy_name)
    if not enabled:
        return module_cls
    return nn.remat(module_cls, policy=policy, **remat_kwargs)
