"""XLA compile options jaxvc adds on a backend by default, merged under the user's own (``config.compiler_options``).

XLA:CPU (jaxlib 0.10) hands whole fusions - a dot with the softmax or GELU around it - to YNNPACK. There an attention
with a few hundred tokens runs several times slower than the plain dot: XLA materializes the fused scalars (the
1/sqrt(d) scale, the softmax's 1/sum) as full (B, H, Lq, Lk) arrays first. On the 2-core CI machine, the tiny
benchmark's UNet forward took 131 ms with the default and 68 ms with YNNPACK limited to lone dots
(``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``); 30-step guided sampling went 3.72 s -> 1.75 s (README, "Benchmarks").

An option this jaxlib does not know is dropped: it is probed once per platform with a one-op compile, so a newer or
older jax (which may rename it) keeps working, just without it. ``JAXVC_XLA_DEFAULTS=0`` turns the defaults off (for
A/B timing).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


@functools.cache
def platform_defaults(platform: str) -> dict[str, Any]:
    """The default options for ``platform`` ("cpu", "gpu", "tpu") that this jaxlib accepts."""
    if os.environ.get("JAXVC_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    import jax
    import numpy as np

    wanted = DEFAULTS.get(platform, {})
    if not wanted or platform != jax.default_backend():  # the probe compiles for the default backend
        return {}
    accepted = {}
    for name, value in wanted.items():
        try:
            jax.jit(lambda x: x + 1).lower(np.float32(0)).compile({name: value})
            accepted[name] = value
        except Exception:  # an option or value this jaxlib does not know
            continue
    return accepted


def merged(user: Mapping[str, Any] | None = None, platform: str | None = None) -> dict[str, Any] | None:
    """``platform``'s defaults (default: JAX's default backend) updated with ``user``'s options; None if empty (as
    ``Lowered.compile`` expects for "no options")."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    options = {**platform_defaults(platform), **dict(user or {})}
    return options or None


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` compiled with ``merged()`` (the default backend's defaults), for functions jitted and
    called directly; code that lowers and compiles itself passes ``merged(...)`` to ``.compile()``."""
    import jax

    options = merged()
    return jax.jit(fn, **kwargs) if options is None else jax.jit(fn, compiler_options=options, **kwargs)
