"""Typed parameters for components: dataclass fields with a doc line and an allowed range.

Each attack, defense or dataset declares a frozen dataclass `Params`. A field is declared with
`param(default, "doc", low=..., high=..., choices=...)`; `resolve_params` turns user overrides
(typed values, or the strings of `--param key=value`) into a validated instance, naming the field,
the value and what is allowed on any error.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from trials.errors import InvalidValue


def param(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple | None = None,
    low_exclusive: bool = False,
) -> Any:
    """A dataclass field with its documentation and allowed values."""
    meta = {"doc": doc, "low": low, "high": high, "choices": choices, "low_exclusive": low_exclusive}
    if isinstance(default, list | dict | tuple):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For components without parameters."""


def describe(params_cls: type) -> list[dict[str, Any]]:
    """One dict per field: name, type, default, doc, allowed (for `bdlab list` and spec checks)."""
    hints = typing.get_type_hints(params_cls)
    rows = []
    for f in dataclasses.fields(params_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(
            {
                "name": f.name,
                "type": type_name(hints[f.name]),
                "default": default,
                "doc": f.metadata.get("doc", ""),
                "allowed": _allowed_text(f, hints[f.name]),
            }
        )
    return rows


def resolve_params(params_cls: type, overrides: Mapping[str, Any] | None, *, owner: str) -> Any:
    """Build `params_cls` from overrides, converting strings and checking every value.

    `owner` prefixes field names in errors, e.g. "attack badnets: param 'size'".
    """
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise InvalidValue(f"{owner}: param", unknown[0], f"valid parameters are: {valid}")
    values = {}
    for name, value in overrides.items():
        field_name = f"{owner}: param '{name}'"
        typed = coerce(value, hints[name], field_name)
        check_range(typed, fields[name], hints[name], field_name)
        values[name] = typed
    instance = params_cls(**values)
    # Defaults are checked too, so a preset or subclass cannot smuggle in an invalid default.
    for name, f in fields.items():
        if name not in values:
            check_range(getattr(instance, name), f, hints[name], f"{owner}: param '{name}'")
    return instance


def parse_assignments(items: list[str] | None, field: str = "--param") -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidValue(field, item, "expected key=value")
        out[key.strip()] = value.strip()
    return out


def as_dict(params: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params).items()}


# --- conversion and checks -------------------------------------------------------------------


def coerce(value: Any, hint: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, field)
            except InvalidValue as err:
                errors.append(err)
        raise errors[0] if errors else InvalidValue(field, value, f"expected {type_name(hint)}")
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise InvalidValue(field, value, f"allowed: {', '.join(map(str, args))}")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            items = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(items, list | tuple):
            raise InvalidValue(field, value, f"expected a list of {type_name(args[0])}")
        inner = args[0] if args else str
        converted = [coerce(v.strip() if isinstance(v, str) else v, inner, field) for v in items]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise InvalidValue(field, value, "expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise InvalidValue(field, value, "expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise InvalidValue(field, value, "expected an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise InvalidValue(field, value, "expected a number")
        if isinstance(value, int | float):
            return float(value)
        try:
            return _parse_float(str(value))
        except ValueError:
            raise InvalidValue(
                field, value, "expected a number (fractions like 6/255 are accepted)"
            ) from None
    if hint is str:
        return str(value)
    return value


def _parse_float(text: str) -> float:
    num, sep, den = text.partition("/")
    return float(num) / float(den) if sep else float(text)


def check_range(value: Any, f: dataclasses.Field, hint: Any, field: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValue(field, value, "expected a finite number")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise InvalidValue(field, value, f"allowed: {', '.join(map(str, choices))}")
    values = value if isinstance(value, list | tuple) else [value]
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        low, high = meta.get("low"), meta.get("high")
        too_low = low is not None and (v <= low if meta.get("low_exclusive") else v < low)
        if too_low or (high is not None and v > high):
            raise InvalidValue(field, value, _range_text(meta))


def _range_text(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    left = "(" if meta.get("low_exclusive") else "["
    if low is not None and high is not None:
        return f"allowed range {left}{low}, {high}]"
    if low is not None:
        return f"must be {'>' if meta.get('low_exclusive') else '>='} {low}"
    return f"must be <= {high}"


def _allowed_text(f: dataclasses.Field, hint: Any) -> str:
    meta = f.metadata
    if meta.get("choices") is not None:
        return "{" + ", ".join(map(str, meta["choices"])) + "}"
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ", ".join(map(str, typing.get_args(hint))) + "}"
    if meta.get("low") is not None or meta.get("high") is not None:
        return _range_text(meta).replace("allowed range ", "").replace("must be ", "")
    return ""


def type_name(hint: Any) -> str:
    """A field's type as users write it: float, int | None, list[float]..."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "str"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        args = typing.get_args(hint)
        return f"list[{type_name(args[0]) if args else 'any'}]"
    return getattr(hint, "__name__", str(hint))
