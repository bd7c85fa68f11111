"""Config files and command-line overrides (the ``ml_collections`` ``config_flags`` idea, usable under argparse).

A config file is a Python file with ``get_config(variant)`` returning an ``ml_collections.ConfigDict``; it is named
on the command line as ``configs/<name>.py:<variant>`` (the variant is optional). Overrides look like
``--config.optim.lr=1e-5`` or ``--config.optim.lr 1e-5``: the key must already exist in the config (a typo is an
error naming the closest keys) and the value is parsed to the existing field's type (int, float, bool, str, tuple,
list, None-able placeholders; anything else through ``ast.literal_eval``).
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import ml_collections

OVERRIDE_PREFIX = "--config."
# The repository root: `configs/toy.py` resolves here when it is not found relative to the working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file, variant or override that cannot be used."""


def resolve_config_path(path: str) -> Path:
    """The config file for ``path`` (relative to the cwd first, then to the repository root)."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(REPO_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file '{path}' not found (looked in {', '.join(str(c) for c in candidates)})")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/file.py[:variant]`` by calling the file's ``get_config(variant)``."""
    path, _, variant = spec.partition(":")
    file = resolve_config_path(path)
    module_spec = importlib.util.spec_from_file_location(f"jaxvc_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{file}' defines no get_config(variant) function")
    takes_variant = len(inspect.signature(module.get_config).parameters) > 0
    if variant and not takes_variant:
        raise ConfigError(f"config file '{file}' has no variants (get_config() takes no argument), got ':{variant}'")
    config = module.get_config(variant or None) if takes_variant else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config in '{file}' returned {type(config).__name__}, "
                          "expected ml_collections.ConfigDict")
    return config


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"override '{key}': expected a boolean (true/false), got '{text}'")


def _literal(text: str, key: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        # An unquoted word (e.g. --config.schedule=cosine) is a string.
        return text


def parse_value(text: str, current: Any, key: str, field_type: type | None = None) -> Any:
    """Parse ``text`` into the type of the field's ``current`` value (``field_type`` for None placeholders)."""
    kind = field_type if current is None else type(current)
    if kind is None:
        value = _literal(text, key)
        return None if isinstance(value, str) and value.lower() == "none" else value
    if text.strip().lower() == "none" and current is None:
        return None
    try:
        if kind is bool:
            return _parse_bool(text, key)
        if kind is int:
            value = _literal(text, key)
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                raise ValueError
            return value
        if kind is float:
            return float(text)
        if kind is str:
            return text
    except ValueError:
        raise ConfigError(f"override '{key}': expected {kind.__name__} (current value {current!r}), "
                          f"got '{text}'") from None
    if kind in (tuple, list):
        value = _literal(text, key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"override '{key}': expected a {kind.__name__} like (1, 2), got '{text}'")
        return kind(value)
    if isinstance(current, (ml_collections.ConfigDict, dict)):
        value = _literal(text, key)
        if not isinstance(value, dict):
            raise ConfigError(f"override '{key}': this is a group of settings; set its fields "
                              f"(e.g. {key}.<field>=...) or give a dict literal, got '{text}'")
        return ml_collections.ConfigDict(value) if isinstance(current, ml_collections.ConfigDict) else value
    value = _literal(text, key)
    if not isinstance(value, kind):
        raise ConfigError(f"override '{key}': expected {kind.__name__} (current value {current!r}), got '{text}'")
    return value


def _field_type(parent: ml_collections.ConfigDict, name: str) -> type | None:
    """The declared type of a field (a ``config_dict.placeholder(float)`` is None-valued but typed float)."""
    try:
        ref = parent.get_ref(name)
    except (ValueError, TypeError, AttributeError, KeyError):
        return None
    field_type = getattr(ref, "get_type", lambda: None)()
    return None if field_type is type(None) else field_type


def set_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Set ``config.<key>`` (dotted) from the string ``text``, checking the key exists and the type fits."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth + 1])
        if isinstance(node, (ml_collections.ConfigDict, dict)):
            keys = list(node.keys())
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                where = ".".join(parts[:depth]) or "config"
                raise ConfigError(f"override '--config.{key}': '{path}' is not a key of {where} "
                                  f"(keys: {', '.join(sorted(keys))}){hint}")
            if depth == len(parts) - 1:
                current = node[part]
                field_type = _field_type(node, part) if isinstance(node, ml_collections.ConfigDict) else None
                value = parse_value(text, current, f"--config.{key}", field_type)
                try:
                    node[part] = value
                except TypeError as err:
                    raise ConfigError(f"override '--config.{key}={text}': {err}") from None
                return
            node = node[part]
        else:
            raise ConfigError(f"override '--config.{key}': '{'.'.join(parts[:depth])}' is a "
                              f"{type(node).__name__}, not a group of settings")


def split_override_args(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pull ``--config.a.b=value`` / ``--config.a.b value`` out of ``argv``: (overrides, remaining args)."""
    overrides: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            body = arg[len(OVERRIDE_PREFIX):]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override '{arg}' has no value (use {arg}=VALUE)")
                key, value = body, argv[i + 1]
                i += 1
            if not key:
                raise ConfigError(f"override '{arg}' names no key")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def accept_config_overrides(parser, epilog: bool = True) -> None:
    """Make ``parser.parse_args`` take ``--config.<key>=<value>`` overrides (argparse would reject them as unknown
    options): they are split off first and land in ``args.config_overrides`` as (key, value) pairs."""
    plain_parse_args = parser.parse_args

    def parse_args(args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            overrides, rest = split_override_args(argv)
        except ConfigError as err:
            parser.error(str(err))
        parsed = plain_parse_args(rest, namespace)
        parsed.config_overrides = overrides
        return parsed

    parser.parse_args = parse_args
    if epilog:
        parser.epilog = f"Config overrides: {OVERRIDE_PREFIX}<key>=<value>, checked against the config's fields."


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str] | str]) -> ml_collections.ConfigDict:
    """Apply overrides given as ``(key, value)`` pairs or ``"a.b=value"`` strings, in order; returns ``config``."""
    for item in overrides:
        if isinstance(item, str):
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key=value")
            key, value = item.split("=", 1)
            key = key[len(OVERRIDE_PREFIX):] if key.startswith(OVERRIDE_PREFIX) else key
        else:
            key, value = item
        set_override(config, key, value)
    return config


def get_config(spec: str, overrides: Iterable[tuple[str, str] | str] = ()) -> ml_collections.ConfigDict:
    """``load_config(spec)`` followed by ``apply_overrides``."""
    return apply_overrides(load_config(spec), overrides)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-able plain dict of the config (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


def write_config(config: ml_collections.ConfigDict, folder: str | os.PathLike):
    """Write ``config.json`` into ``folder`` (the record of how a run was configured; a local folder or a bucket
    URL)."""
    from jaxvc.storage import run_path

    folder = run_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return path


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """Rebuild a ConfigDict from ``config_to_dict`` output (lists stay lists)."""
    return ml_collections.ConfigDict(values)


__all__ = [
    "ConfigError", "load_config", "apply_overrides", "set_override", "split_override_args", "get_config",
    "parse_value", "config_to_dict", "config_from_dict", "write_config",
]
