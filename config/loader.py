"""Load the YAML config: parse, expand ${VAR} / ${VAR:-default} in strings, validate into frozen Structs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from config.schema import Config

__all__ = ["ConfigError", "default_config_path", "expand_env", "load_config", "parse_config"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config that cannot be used; the message is one line naming the key path and the problem."""


def default_config_path() -> Path:
    return Path(__file__).with_name("default.yaml")


def expand_env(value: Any, env: Mapping[str, str]) -> Any:
    """Expand variables in every string of the parsed tree (never in the raw text, so values can't inject YAML)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, env) for k, v in value.items()}
    return value


def _path_of(message: str) -> tuple[str, str]:
    # msgspec: "Expected `int`, got `str` - at `$.server.port`"
    problem, sep, where = message.rpartition(" - at ")
    where = where.strip("`") if sep else "$"
    problem = problem if sep else message
    # cross-field checks in __post_init__ name their own path relative to where they ran: "models[1]: ..."
    inner = re.match(r"^([A-Za-z_][\w.\[\]]*): (.*)$", problem)
    if inner:
        return f"{where}.{inner.group(1)}", inner.group(2)
    return where, problem


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{source}: {where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: $: expected a mapping at the top level")
    data = expand_env(data, os.environ if env is None else env)
    try:
        # strict=False lets "${PORT:-8000}" (a string after expansion) become an int
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        path, problem = _path_of(str(exc))
        raise ConfigError(f"{source}: {path}: {problem}") from None


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    file = Path(path) if path else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, env, source=str(file))
