"""Settings dataclasses and the one parser that reads them: documented fields with ranges
(:func:`setting`), values from YAML or the command line read as the fields' types
(:func:`coerce_field`; one spelling of booleans everywhere), ranges and choices enforced
(:func:`validate_fields`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from metagrad.errors import ConfigError

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            group: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field documented by ``help``, with its valid range: ``min <= value <= max``,
    ``above < value < below``; ``group`` places its flag in ``--help``."""
    metadata = {"help": help, "min": min, "max": max, "above": above, "below": below,
                "group": group}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# -- the parser ----------------------------------------------------------------------------------

def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null",
                                                                                  ""))


def coerce_value(value: Any, hint: Any) -> Any:
    """``value`` (from YAML or the command line) as type ``hint``: bool (true/false, yes/no,
    on/off, 1/0), int, float, str, ``Literal[...]``, ``tuple[T, ...]``, ``list[T]``, ``X | None``.
    Raises ``ValueError``/``TypeError`` when it is not one."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if _empty(value) and type(None) in args:
            return None
        return coerce_value(value, next(a for a in args if a is not type(None)))
    if _empty(value):
        raise ValueError("empty")
    if origin is Literal:
        if str(value) not in [str(a) for a in args]:
            raise ValueError(value)
        return str(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = value.strip("()[] ").replace(",", " ").split()
        elif not isinstance(value, list | tuple):
            value = [value]
        items = [coerce_value(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise ValueError(value)
    if hint in (int, float):
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                return int(number)
            return int(value)
        return float(value)
    if isinstance(value, dict | list):
        raise TypeError("expected a single value")
    return str(value)


def describe_type(hint: Any) -> str:
    """A reader's name for ``hint`` (``int``, ``one of a, b``, ``list of int``, ``... or none``)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or none" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list of {describe_type(args[0])}"
    return getattr(hint, "__name__", str(hint))


def type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """``value`` read as the type of field ``name`` of dataclass ``cls``, or a ConfigError."""
    hint = type_hints(cls)[name]
    try:
        return coerce_value(value, hint)
    except (TypeError, ValueError, StopIteration):
        choices = [a for a in get_args(hint) if isinstance(a, str)]
        if get_origin(hint) is Literal and isinstance(value, str):
            raise ConfigError(unknown(f"{name} value", value, choices)) from None
        raise ConfigError(f"{name}: cannot read {value!r} as {describe_type(hint)}") from None


def validate_fields(obj: Any) -> None:
    """Every field of dataclass ``obj`` holds a value of its choices (``Literal``) and every
    numeric field is finite and within its declared range (:func:`setting`)."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints.get(f.name)
        choices = [a for a in get_args(hint) if isinstance(a, str)]
        if get_origin(hint) is Literal and value not in choices:
            raise ConfigError(unknown(f"{f.name} value", str(value), choices))
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            low, high, above, below = (f.metadata.get(k) for k in ("min", "max", "above",
                                                                   "below"))
            bad = not math.isfinite(v) or (low is not None and v < low) or (
                high is not None and v > high) or (above is not None and v <= above) or (
                below is not None and v >= below)
            if bad:
                parts = ([f">= {low}"] if low is not None else []) + (
                    [f"> {above}"] if above is not None else []) + (
                    [f"<= {high}"] if high is not None else []) + (
                    [f"< {below}"] if below is not None else [])
                kind = "an integer" if _integer_only(hint) else "a finite number"
                raise ConfigError(f"{f.name} must be {kind} {' and '.join(parts)}, got {v!r}"
                                  .replace("  ", " "))


def _integer_only(hint: Any) -> bool:
    """Whether the numbers a field of type ``hint`` holds are integers (``int``, ``list[int]``,
    ``int | None``...) rather than floats."""
    def numbers(h: Any) -> set[type]:
        if h in (int, float):
            return {h}
        return set().union(*(numbers(a) for a in get_args(h))) if get_args(h) else set()

    return numbers(hint) == {int}


def unknown(kind: str, value: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {value!r}.{hint} Valid: {', '.join(choices)}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings from ``path``, or a ConfigError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path} is not readable YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return data
