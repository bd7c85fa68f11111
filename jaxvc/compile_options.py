"""XLA compile options jaxvc adds on a backend by default, merged under the user's own (``config.compiler_options``).

XLA:CPU in jaxlib 0.10 hands whole fusions - a dot with the softmax or GELU around it - to YNNPACK. There an
attention with a few hundred tokens runs several times slower than the plain dot: XLA materializes the fused scalars
(the 1/sqrt(d) scale, the softmax's 1/sum) as full (B, H, Lq, Lk) arrays first. Limiting YNNPACK to lone dots
(``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``) fixes that there. Measured on the 2-core CI machine, the median ms of one
guided UNet forward of the tiny benchmark (4 runs each, session 11):

    jaxlib 0.10.2     default 70-78, with the option 52-56   -> applied
    jaxlib 0.11.2     default 47,    with the option 55      -> not applied (XLA's own fusions are better there)
    jaxlib 0.12.0.1   default 40,    with the option 62      -> not applied

So each default names the jaxlib versions it was measured to help. An option this jaxlib rejects is dropped as well:
it is probed once per platform with a one-op compile. ``JAXVC_XLA_DEFAULTS=0`` turns the defaults off (for A/B
timing).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Any, Mapping

# platform -> [(jaxlib version prefixes it helps, options)]
DEFAULTS: dict[str, list[tuple[tuple[str, ...], dict[str, Any]]]] = {
    "cpu": [(("0.10.",), {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"})],
}


def jaxlib_version() -> str:
    import jaxlib

    return jaxlib.__version__


@functools.cache
def platform_defaults(platform: str) -> dict[str, Any]:
    """The default options for ``platform`` ("cpu", "gpu", "tpu") that this jaxlib accepts."""
    if os.environ.get("JAXVC_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    import jax
    import numpy as np

    version = jaxlib_version()
    wanted = {name: value for prefixes, options in DEFAULTS.get(platform, []) if version.startswith(prefixes)
              for name, value in options.items()}
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


_SCOPED: contextvars.ContextVar = contextvars.ContextVar("jaxvc_compile_options", default=None)


@contextlib.contextmanager
def scope(options: Mapping[str, Any] | None):
    """Within: ``current()`` is ``options`` (the trainer's, around code that compiles programs itself, such as a
    method's component inits), so that they compile as the run's other programs do."""
    token = _SCOPED.set(("scoped", dict(options or {}) or None))
    try:
        yield
    finally:
        _SCOPED.reset(token)


def current() -> dict[str, Any] | None:
    """The options of the enclosing ``scope``, else ``merged()`` (the default backend's defaults)."""
    scoped = _SCOPED.get()
    return scoped[1] if scoped is not None else merged()


def jit(fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` compiled with ``merged()`` (the default backend's defaults), for functions jitted and
    called directly; code that lowers and compiles itself passes ``merged(...)`` to ``.compile()``.

    Called inside another trace (the pipeline's generation traced into the trainer's validation-sample program),
    the function is inlined into the outer program instead: jax refuses compiler options on a nested jit, and the
    outer program's own options apply to the whole."""
    import functools

    import jax

    options = merged()
    if options is None:
        return jax.jit(fn, **kwargs)
    jitted = jax.jit(fn, compiler_options=options, **kwargs)

    @functools.wraps(fn)
    def call(*args, **call_kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, call_kwargs))):
            return fn(*args, **call_kwargs)
        return jitted(*args, **call_kwargs)

    call.lower, call.trace = jitted.lower, jitted.trace  # the AOT entry points (bench lowers and compiles)
    return call
