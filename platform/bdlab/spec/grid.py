"""Grids of typed values: `{param: value | [values]}` in a spec -> the grid's points, each value checked
against the typed parameters (`trials.params`) of the dataset or attack it belongs to.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from bdlab.spaces import at, field_kind_of
from trials.errors import InvalidValue
from trials.params import as_dict, resolve_params


def expand_grid(params_classes: list[type], raw: Any, where: str, owner: str) -> list[dict[str, Any]]:
    """Expand `{param: value | [values]}` into grid points of typed values (the spec's values only).

    A list is a grid of values, except for a list-typed param, whose grid is a list of lists.
    """
    raw = mapping(raw, where)
    fields: dict[str, tuple[dataclasses.Field, Any, type]] = {}
    for cls in params_classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            fields[f.name] = (f, hints[f.name], cls)
    axes: list[list[Any]] = []
    for name, value in raw.items():
        if name not in fields:
            raise InvalidValue(
                where, name, f"{owner} has the parameters: {', '.join(sorted(fields)) or 'none'}"
            )
        f, hint, cls = fields[name]
        list_typed = field_kind_of(hint)[0] == "list"
        is_grid = isinstance(value, list) and (
            not list_typed or (bool(value) and all(isinstance(v, list) for v in value))
        )
        values = value if is_grid else [value]
        if not values:
            raise InvalidValue(at(where, name), value, "an empty list: give one value or a list of values")
        typed = []
        for v in values:
            with located(at(where, name)):
                typed.append(as_dict(resolve_params(cls, {name: v}, owner=owner))[name])
        axes.append(typed)
    points = [dict(zip(raw, combo, strict=True)) for combo in itertools.product(*axes)]
    for point in points:
        for cls in params_classes:
            own = {k: v for k, v in point.items() if fields[k][2] is cls}
            with located(where, keep_field=True):
                resolve_params(cls, own, owner=owner)
    return points


def mapping(raw: Any, where: str, what: str = "a mapping") -> dict:
    if not isinstance(raw, Mapping):
        raise InvalidValue(where, raw, f"expected {what} (key: value)")
    return dict(raw)


@contextmanager
def located(where: str, keep_field: bool = False) -> Iterator[None]:
    """Re-raise an InvalidValue from `trials` at a location in the spec (keeping its field name
    in the message when it says more than the location)."""
    try:
        yield
    except InvalidValue as err:
        allowed = f"{err.field}: {err.allowed}" if keep_field else err.allowed
        raise InvalidValue(where, err.value, allowed) from None
