"""Optuna search spaces over a defense's typed parameters.

A space is a mapping param -> distribution, written in YAML as

    lr: {float: [0.001, 0.1], log: true}
    epochs: {int: [10, 100], step: 10}
    betas: {choice: [[500, 1000], [250, 500]]}

and kept as small frozen dataclasses (`FloatDist`, `IntDist`, `ChoiceDist`). Each defense's default
space lives in `trials/defenses/spaces/<defense>.yaml`; a sweep may also give one inline. Loading checks
every searched name against the defense's `Params` and every bound or choice against the field's type
and allowed range, so a bad space fails when the sweep is loaded, not in a trial.

Optuna's categorical choices must be None, bool, int, float or str. A choice list that holds lists
(list-typed params such as NAD's `betas`) is therefore handed to Optuna as JSON strings and decoded
back by `suggest` / `decode`; `encode` does the reverse for `study.enqueue_trial`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trials.errors import InvalidValue
from trials.params import check_range, coerce, type_name
from trials.presets import SPACE_DIR

# the folder holding the `trials` package: the repository in a checkout, site-packages when installed
ROOT = SPACE_DIR.parents[2]

_SCALARS = (type(None), bool, int, float, str)


# --- the distributions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatDist:
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def to_optuna(self) -> Any:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: Any, name: str) -> float:
        return float(trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step))

    def decode(self, value: Any) -> float:
        return float(value)

    def encode(self, value: Any) -> float:
        return float(value)

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return math.isclose(steps, round(steps), abs_tol=1e-8)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"float": [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def __str__(self) -> str:
        extra = ", log" if self.log else (f", step {self.step}" if self.step is not None else "")
        return f"float [{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class IntDist:
    low: int
    high: int
    log: bool = False
    step: int = 1

    def to_optuna(self) -> Any:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: Any, name: str) -> int:
        return int(trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log))

    def decode(self, value: Any) -> int:
        return int(value)

    def encode(self, value: Any) -> int:
        return int(value)

    def contains(self, value: Any) -> bool:
        return (
            _is_number(value)
            and float(value).is_integer()
            and self.low <= value <= self.high
            and (int(value) - self.low) % self.step == 0
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"int": [self.low, self.high]}
        if self.log:
            out["log"] = True
        if self.step != 1:
            out["step"] = self.step
        return out

    def __str__(self) -> str:
        extra = ", log" if self.log else (f", step {self.step}" if self.step != 1 else "")
        return f"int [{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class ChoiceDist:
    """Choices as typed param values; list values are kept as tuples (hashable) and decode to lists."""

    choices: tuple[Any, ...]

    @property
    def encoded(self) -> bool:
        """Whether Optuna sees JSON strings (some choice is a list) instead of the values themselves."""
        return any(isinstance(c, tuple) for c in self.choices)

    def optuna_choices(self) -> tuple[Any, ...]:
        if not self.encoded:
            return self.choices
        return tuple(json.dumps(list(c) if isinstance(c, tuple) else c) for c in self.choices)

    def to_optuna(self) -> Any:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.optuna_choices())

    def suggest(self, trial: Any, name: str) -> Any:
        return self.decode(trial.suggest_categorical(name, self.optuna_choices()))

    def decode(self, value: Any) -> Any:
        if self.encoded:
            value = json.loads(value)
        return list(value) if isinstance(value, list | tuple) else value

    def encode(self, value: Any) -> Any:
        """A param value -> what Optuna stores for it (for `study.enqueue_trial`)."""
        if not self.encoded:
            return value
        return json.dumps(list(value) if isinstance(value, list | tuple) else value)

    def contains(self, value: Any) -> bool:
        key = _choice_key(value)
        return any(_choice_key(c) == key for c in self.choices)

    def as_dict(self) -> dict[str, Any]:
        return {"choice": [list(c) if isinstance(c, tuple) else c for c in self.choices]}

    def __str__(self) -> str:
        return "choice {" + ", ".join(json.dumps(v) for v in self.as_dict()["choice"]) + "}"


Distribution = FloatDist | IntDist | ChoiceDist


# --- the public functions ---------------------------------------------------------------------------


def space_path(defense: str) -> Path:
    return SPACE_DIR / f"{defense}.yaml"


def display_path(path: Path) -> str:
    """A path relative to the repository when it lies inside it (shorter errors)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_space(defense: str) -> dict[str, Distribution]:
    """The default space of a defense: `trials/defenses/spaces/<defense>.yaml`, validated."""
    from trials.defenses import DEFENSES

    DEFENSES.get(defense)
    path = space_path(defense)
    where = display_path(path)
    if not path.exists():
        raise InvalidValue(f"default space of defense {defense}", where, "the file does not exist")
    raw = read_yaml(path, where)
    if raw is None:
        return {}
    return parse_space(defense, raw, where)


def parse_space(defense: str, raw: Any, where: str) -> dict[str, Distribution]:
    """Validate a raw mapping param -> distribution against the defense's `Params`.

    `where` locates the mapping in errors: a file (`trials/defenses/spaces/bcu.yaml`) or a file and
    a path inside it (`sweep.yaml: defenses[1].space`); each param's errors add `.name` to it.
    """
    from trials.defenses import DEFENSES

    params_cls = DEFENSES.get(defense).Params
    if not isinstance(raw, Mapping):
        raise InvalidValue(
            where, raw, "expected a mapping param -> {float: [low, high]} | {int: ...} | {choice: [...]}"
        )
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    space: dict[str, Distribution] = {}
    for name, spec in raw.items():
        if name not in fields:
            raise InvalidValue(
                where, name, f"defense {defense} has the parameters: {', '.join(sorted(fields))}"
            )
        space[name] = parse_distribution(
            spec, fields[name], hints[name], at(where, name), f"{defense}.{name}"
        )
    return space


def to_optuna(space: Mapping[str, Distribution]) -> dict[str, Any]:
    """`{param: optuna.distributions.BaseDistribution}`, e.g. for Ray's `OptunaSearch(space=...)`."""
    return {name: dist.to_optuna() for name, dist in space.items()}


def suggest(trial: Any, space: Mapping[str, Distribution]) -> dict[str, Any]:
    """Define-by-run sampling: one `trial.suggest_*` per param, decoded to real param values."""
    return {name: dist.suggest(trial, name) for name, dist in space.items()}


def decode(space: Mapping[str, Distribution], optuna_params: Mapping[str, Any]) -> dict[str, Any]:
    """The param values of a finished trial (`trial.params`): the same decoding as `suggest`."""
    return {name: dist.decode(optuna_params[name]) for name, dist in space.items() if name in optuna_params}


def encode(space: Mapping[str, Distribution], params: Mapping[str, Any]) -> dict[str, Any]:
    """Param values -> Optuna's representation, for `study.enqueue_trial` (e.g. the default config)."""
    return {name: dist.encode(params[name]) for name, dist in space.items() if name in params}


# --- parsing one distribution -----------------------------------------------------------------------

_KINDS = ("float", "int", "choice")
_OPTIONS = {"float": ("log", "step"), "int": ("log", "step"), "choice": ()}


def parse_distribution(
    spec: Any, field: dataclasses.Field, hint: Any, where: str, owner: str
) -> Distribution:
    """One `{float|int|choice: ...}` entry, checked against the field it searches."""
    if not isinstance(spec, Mapping):
        raise InvalidValue(
            where, spec, "expected {float: [low, high]}, {int: [low, high]} or {choice: [...]}"
        )
    kinds = [k for k in _KINDS if k in spec]
    if len(kinds) != 1:
        raise InvalidValue(where, dict(spec), "expected exactly one of the keys float, int, choice")
    kind = kinds[0]
    valid = (kind, *_OPTIONS[kind])
    unknown = [k for k in spec if k not in valid]
    if unknown:
        raise InvalidValue(where, unknown[0], f"a {kind} distribution takes the keys: {', '.join(valid)}")
    field_kind = field_kind_of(hint)[0]
    allowed = _allowed_kinds(field_kind, field)
    if kind not in allowed:
        raise InvalidValue(
            where,
            dict(spec),
            f"{owner} has type {type_name(hint)}, searched with: {' or '.join(allowed)}",
        )
    if kind == "choice":
        return _parse_choice(spec["choice"], field, hint, where, owner, field_kind)
    if kind == "float":
        dist: Distribution = _parse_float(spec, where)
    else:
        dist = _parse_int(spec, where)
    for bound in (dist.low, dist.high):
        try:
            check_range(bound, field, hint, owner)
        except InvalidValue as err:
            raise InvalidValue(
                where, bound, f"the bounds must lie in the allowed values of {owner}: {err.allowed}"
            ) from None
    return dist


def _parse_float(spec: Mapping[str, Any], where: str) -> FloatDist:
    low, high = _bounds(spec["float"], float, where, "float")
    log = _flag(spec.get("log", False), at(where, "log"))
    step = spec.get("step")
    if step is not None:
        step = coerce(step, float, at(where, "step"))
        if step <= 0:
            raise InvalidValue(at(where, "step"), step, "must be > 0")
        if log:
            raise InvalidValue(at(where, "step"), step, "log and step cannot be combined (Optuna)")
        if not FloatDist(low, high, step=step).contains(high):
            raise InvalidValue(
                at(where, "step"), step, f"high - low ({high} - {low}) must be a multiple of step"
            )
    if log and low <= 0:
        raise InvalidValue(at(where, "float"), low, "a log distribution needs low > 0")
    return FloatDist(low, high, log, step)


def _parse_int(spec: Mapping[str, Any], where: str) -> IntDist:
    low, high = _bounds(spec["int"], int, where, "int")
    log = _flag(spec.get("log", False), at(where, "log"))
    step = spec.get("step", 1)
    step = coerce(step, int, at(where, "step"))
    if step < 1:
        raise InvalidValue(at(where, "step"), step, "must be >= 1")
    if log and step != 1:
        raise InvalidValue(at(where, "step"), step, "log and step cannot be combined (Optuna)")
    if (high - low) % step:
        raise InvalidValue(at(where, "step"), step, f"high - low ({high} - {low}) must be a multiple of step")
    if log and low < 1:
        raise InvalidValue(at(where, "int"), low, "a log distribution needs low >= 1")
    return IntDist(low, high, log, step)


def _bounds(raw: Any, kind: type, where: str, key: str) -> tuple[Any, Any]:
    field = at(where, key)
    if not isinstance(raw, list | tuple) or len(raw) != 2:
        raise InvalidValue(field, raw, "expected [low, high]")
    low, high = (coerce(v, kind, field) for v in raw)
    for v in (low, high):
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidValue(field, v, "expected a finite number")
    if not low < high:
        raise InvalidValue(field, list(raw), "expected low < high (fix one value with `fixed:` instead)")
    return low, high


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(field, value, "expected true or false")
    return value


def _parse_choice(
    raw: Any, field: dataclasses.Field, hint: Any, where: str, owner: str, field_kind: str
) -> ChoiceDist:
    where = at(where, "choice")
    if not isinstance(raw, list) or not raw:
        raise InvalidValue(where, raw, "expected a non-empty list of values")
    typed = []
    for i, value in enumerate(raw):
        loc = at(where, i)
        is_list = isinstance(value, list | tuple)
        if field_kind == "list" and not is_list and value is not None:
            raise InvalidValue(loc, value, f"{owner} has type {type_name(hint)}: each choice must be a list")
        if field_kind != "list" and is_list:
            raise InvalidValue(loc, value, f"{owner} has type {type_name(hint)}: a choice cannot be a list")
        if isinstance(value, Mapping) or (is_list and not all(isinstance(v, _SCALARS) for v in value)):
            raise InvalidValue(loc, value, "choices are numbers, strings, booleans, null or lists of them")
        try:
            v = coerce(value, hint, owner)
            check_range(v, field, hint, owner)
        except InvalidValue as err:
            raise InvalidValue(loc, value, f"not a valid value of {owner}: {err.allowed}") from None
        typed.append(tuple(v) if isinstance(v, list | tuple) else v)
    keys = [_choice_key(v) for v in typed]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise InvalidValue(at(where, i), raw[i], "each choice may appear once")
    return ChoiceDist(tuple(typed))


# --- helpers ----------------------------------------------------------------------------------------


def at(where: str, key: str | int) -> str:
    """Extend an error location: `file` + k -> `file: k`; `file: a` + k -> `file: a.k`; ints -> `[i]`."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def read_yaml(path: Path, where: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise InvalidValue(where, "(file)", f"not valid YAML: {first}") from None
    except OSError as err:
        raise InvalidValue(where, str(path), f"cannot be read: {err.strerror}") from None


def field_kind_of(hint: Any) -> tuple[str, bool]:
    """(float | int | bool | str | list | other, whether None is allowed) for a Params field hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = field_kind_of(args[0])[0] if len(args) == 1 else "other"
        return kind, type(None) in typing.get_args(hint)
    if origin is typing.Literal:
        return "str", False
    if origin in (list, tuple) or hint in (list, tuple):
        return "list", False
    for kind in (bool, int, float, str):
        if hint is kind:
            return kind.__name__, False
    return "other", False


def _allowed_kinds(field_kind: str, field: dataclasses.Field) -> tuple[str, ...]:
    if field.metadata.get("choices") is not None:
        return ("choice",)
    return {"float": ("float", "choice"), "int": ("int", "choice")}.get(field_kind, ("choice",))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _choice_key(value: Any) -> str:
    """Choices compare by their JSON form: lists equal tuples, true differs from 1, 1 from 1.0."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)
