"""The environment a config asks for at launch:
``python -m jaxvc.launch_env --config FILE.py[:VARIANT] [--config.k=v]``.

XLA and libtpu read their flags from the environment before the first computation (``LIBTPU_INIT_ARGS`` on TPU,
``XLA_FLAGS`` everywhere), so they cannot be set from inside ``jaxvc train``; the launch scripts (launch/*.sh) call
this helper on the launching machine and put its ``export`` lines in front of the training command on every host.

The config group read (all optional; a config without ``launch`` gives an empty environment)::

    config.launch.libtpu_init_args  tuple of "--flag=value" for libtpu (TPU only)
    config.launch.xla_flags         tuple of "--flag=value" for XLA on every platform
    config.launch.gpu_xla_flags     tuple of "--flag=value" added to XLA_FLAGS on GPU only
    config.launch.env               extra variables, {"NAME": "value"}

Output formats: ``sh`` (``export NAME=value`` lines, shell-quoted), ``json`` (one object), ``lines``
(``NAME=value``, unquoted, for container env lists).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from typing import Any, Mapping

from jaxvc.config_utils import ConfigError, apply_overrides, load_config, split_override_args

PLATFORMS = ("tpu", "gpu", "cpu")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FLAG = re.compile(r"^--[A-Za-z0-9_]+(=\S*)?$")


def _flags(launch: Mapping[str, Any], key: str) -> list[str]:
    values = launch.get(key, ()) or ()
    if isinstance(values, str):
        raise ConfigError(f"config.launch.{key} must be a tuple of '--flag=value' strings, got the string "
                          f"{values!r} (write ({values!r},))")
    flags = []
    for value in values:
        if not isinstance(value, str) or not _FLAG.match(value):
            raise ConfigError(f"config.launch.{key}: {value!r} is not one '--flag=value' (no spaces, leading --)")
        flags.append(value)
    return flags


def launch_env(config, platform: str = "tpu") -> dict[str, str]:
    """The environment variables ``config.launch`` asks for on ``platform`` (insertion-ordered)."""
    if platform not in PLATFORMS:
        raise ConfigError(f"platform '{platform}' is not one of {', '.join(PLATFORMS)}")
    launch = config.get("launch", None) if hasattr(config, "get") else None
    if launch is None:
        return {}
    env: dict[str, str] = {}
    libtpu = _flags(launch, "libtpu_init_args")
    xla = _flags(launch, "xla_flags") + (_flags(launch, "gpu_xla_flags") if platform == "gpu" else [])
    if platform == "tpu" and libtpu:
        env["LIBTPU_INIT_ARGS"] = " ".join(libtpu)
    if xla:
        env["XLA_FLAGS"] = " ".join(xla)
    for name, value in dict(launch.get("env", {}) or {}).items():
        if not _ENV_NAME.match(str(name)):
            raise ConfigError(f"config.launch.env: '{name}' is not a valid environment variable name")
        if name in env:
            raise ConfigError(f"config.launch.env sets {name}, which comes from config.launch's flag lists; "
                              f"add the flags there instead")
        env[str(name)] = str(value)
    return env


def format_env(env: Mapping[str, str], fmt: str = "sh") -> str:
    """``env`` as text: ``sh`` export lines, ``json``, or ``lines`` (NAME=value)."""
    if fmt == "json":
        return json.dumps(dict(env), indent=None)
    if fmt == "lines":
        return "".join(f"{name}={value}\n" for name, value in env.items())
    if fmt == "sh":
        return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    raise ValueError(f"unknown format '{fmt}' (sh, json, lines)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxvc.launch_env", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, metavar="FILE.py[:VARIANT]")
    parser.add_argument("--platform", choices=PLATFORMS, default="tpu")
    parser.add_argument("--format", choices=("sh", "json", "lines"), default="sh")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, rest = split_override_args(argv)
    except ConfigError as err:
        parser.error(str(err))
    args = parser.parse_args(rest)
    try:
        config = apply_overrides(load_config(args.config), overrides)
        env = launch_env(config, args.platform)
    except (ConfigError, ValueError) as err:
        print(f"jaxvc.launch_env: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(format_env(env, args.format))
    if args.format == "json":
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
