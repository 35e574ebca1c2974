from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from trials.errors import InvalidValue
from trials.params import describe, param, parse_assignments, resolve_params


@dataclass(frozen=True)
class P:
    eps: float = param(6 / 255, "budget", low=0.0, high=1.0)
    steps: int = param(7, "steps", low=1)
    mode: Literal["a", "b"] = param("a", "mode")
    flag: bool = param(False, "flag")
    sizes: tuple[int, ...] = param((1, 2), "sizes", low=1)
    count: int | None = param(None, "count", low=1)


def test_defaults_and_string_coercion():
    p = resolve_params(
        P,
        {"eps": "8/255", "steps": "3", "mode": "b", "flag": "true", "sizes": "3,4", "count": "5"},
        owner="x",
    )
    assert p == P(eps=8 / 255, steps=3, mode="b", flag=True, sizes=(3, 4), count=5)
    assert resolve_params(P, {}, owner="x") == P()
    assert resolve_params(P, {"count": "none"}, owner="x").count is None


@pytest.mark.parametrize(
    "overrides, field, needle",
    [
        ({"eps": "2"}, "eps", "[0.0, 1.0]"),
        ({"steps": "0"}, "steps", ">= 1"),
        ({"steps": "1.5"}, "steps", "integer"),
        ({"mode": "c"}, "mode", "a, b"),
        ({"flag": "maybe"}, "flag", "true or false"),
        ({"sizes": "0,1"}, "sizes", ">= 1"),
        ({"nope": "1"}, "param", "valid parameters are"),
        ({"eps": "nan"}, "eps", "finite"),
    ],
)
def test_errors_name_field_value_and_allowed(overrides, field, needle):
    with pytest.raises(InvalidValue) as err:
        resolve_params(P, overrides, owner="attack t")
    message = str(err.value)
    assert "\n" not in message
    assert field in message and needle in message
    assert str(list(overrides.values())[0]) in message or list(overrides)[0] in message


def test_parse_assignments():
    assert parse_assignments(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(InvalidValue, match="key=value"):
        parse_assignments(["novalue"])


def test_describe_lists_every_field():
    rows = {r["name"]: r for r in describe(P)}
    assert set(rows) == {"eps", "steps", "mode", "flag", "sizes", "count"}
    assert rows["mode"]["allowed"] == "{a, b}"
    assert rows["steps"]["default"] == 7
