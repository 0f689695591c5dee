"""Checking one configuration value against its field annotation (:func:`coerce`).

Apart from :mod:`ldct.config` so the sections and the loaders there stay one readable module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import numpy as np

from ldct.errors import LdctError


class ConfigError(LdctError, ValueError):
    """A profile or an override names an unknown key or carries a value of the wrong type."""


def coerce(value: Any, annotation: Any, where: str, *, strict: bool = False) -> Any:
    """Check/convert one value against a field annotation; raise ConfigError naming `where`.

    ``strict`` (construction) accepts only values already of the field's type: text is parsed and
    lists become tuples only on the way in (profiles, overrides, flat dicts, :func:`replace`).
    """
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        for option in allowed:
            kind = type(option)
            try:
                got = value if kind is str else coerce(value, kind, where, strict=strict)
            except ConfigError:
                continue
            if type(got) is kind and got == option:  # type() too: True == 1, yet Literal[1] != True
                return got
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    if origin is tuple:
        if strict and not isinstance(value, tuple):
            raise ConfigError(f"{where}: expected a tuple, got {value!r}")
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.strip("()[]").split(",")) if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], where, strict=strict) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(coerce(v, a, where, strict=strict) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(annotation):
            try:
                return coerce(value, arg, where, strict=strict)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = value.lower() if isinstance(value, str) and not strict else None
        if text in ("true", "false", "1", "0", "yes", "no"):
            return text in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int | np.integer):
            return int(value)
        if not strict and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if not strict and isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float | np.integer | np.floating):
            return float(value)
        if not strict and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        raise ConfigError(f"{where}: expected a {annotation.__name__}, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {annotation!r}")
