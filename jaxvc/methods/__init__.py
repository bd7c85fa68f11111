"""Training methods and the registry the trainer looks them up in (``config.method`` names one).

``METHODS`` maps a name to ``"module:attribute"``; the attribute is a ``Method`` subclass (or any factory) called
with the full config. Entries are strings so that naming a method imports only that method's code.
"""
from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "toy": "jaxvc.methods.toy_denoiser:ToyDenoiser",
    "videomaker": "jaxvc.methods.videomaker:from_config",
    "still_moving": "jaxvc.methods.still_moving:from_config",
    "customcrafter": "jaxvc.methods.customcrafter:from_config",
    "microcinema": "jaxvc.methods.microcinema:from_config",
    "disentangled_s2v": "jaxvc.methods.disentangled_s2v:from_config",
}


def get_method_factory(name: str):
    """The class (factory) registered under ``name``."""
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}' (config.method); registered: {', '.join(sorted(METHODS))}")
    target = METHODS[name]
    if not isinstance(target, str):
        return target
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def build_method(config):
    """Instantiate ``METHODS[config.method]`` with the full config."""
    return get_method_factory(config.method)(config)
