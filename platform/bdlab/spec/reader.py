"""Reading a sweep file: YAML -> a validated `SweepSpec` (bdlab.spec.model) of attack cells and
defense entries.

    name: quickstart
    datasets: [digits]
    models: [mini_resnet]
    attacks: [{name: badnets, params: {ratio: [0.05, 0.1]}}, blended]
    defaults: {preset: cpu, trials: 3}
    defenses: [dhbe, bcu, clp, ft]

The format is described in `search_spaces/README.md`. Every name, parameter, preset and search
distribution is checked here, and every defense's default configuration (preset + fixed) is resolved
through the defense's typed parameters, so a bad spec fails at load time with one line naming the file,
the path inside it, the value and what is allowed, never inside a trial.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bdlab.spaces import Distribution, at, display_path, load_space, parse_space, read_yaml
from bdlab.spec.grid import expand_grid, located, mapping
from bdlab.spec.model import (
    DIRECTIONS,
    AttackCell,
    DefenseEntry,
    FailurePolicy,
    Resources,
    SamplerSettings,
    StudyDesign,
    SweepSpec,
    TrialResources,
)
from trials.errors import InvalidValue
from trials.params import as_dict, resolve_params

TOP_KEYS = (
    "name",
    "datasets",
    "models",
    "attacks",
    "seeds",
    "attack_training",
    "defaults",
    "defenses",
    "objectives",
    "sampler",
    "resources",
    "failure",
    "device",
    "plugins",
)
REQUIRED_KEYS = ("name", "datasets", "models", "attacks", "defenses")
DATASET_KEYS = ("name", "params", "root")
ATTACK_KEYS = ("name", "params")
DEFENSE_KEYS = ("name", "preset", "fixed", "space", "trials", "study")
DEFAULTS_KEYS = ("preset", "space", "trials", "study")
DEFAULT_OBJECTIVES = {"acc": "max", "asr": "min"}
DEFAULT_TRIALS = 4
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


# --- loading ----------------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    source = display_path(path)
    if not path.is_file():
        raise InvalidValue("sweep", str(path), "no such file")
    return parse_sweep(read_yaml(path, source), source)


def parse_sweep(data: Any, source: str = "<inline>") -> SweepSpec:
    """Validate a sweep mapping (as read from YAML); errors are located as `<source>: <path>`."""
    data = _mapping(data, source, TOP_KEYS, REQUIRED_KEYS, what="a sweep")
    plugins = _plugins(data.get("plugins") or [], at(source, "plugins"))
    name = data["name"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidValue(at(source, "name"), name, "letters, digits, '_', '.' and '-' only (at least one)")
    seeds = _seeds(data.get("seeds", [0]), at(source, "seeds"))
    training = _training(data.get("attack_training") or {}, at(source, "attack_training"))
    datasets = _datasets(data["datasets"], at(source, "datasets"))
    models = _models(data["models"], at(source, "models"))
    attacks = _attacks(data["attacks"], at(source, "attacks"))
    cells = _attack_cells(datasets, models, attacks, seeds, training, source)
    defaults = _mapping(data.get("defaults") or {}, at(source, "defaults"), DEFAULTS_KEYS)
    if "trials" in defaults and "study" in defaults:
        raise InvalidValue(at(source, "defaults"), "study", "trials (a search) or study, not both")
    defenses = _defenses(data["defenses"], defaults, source)
    return SweepSpec(
        name=name,
        attack_cells=cells,
        defenses=defenses,
        objectives=_objectives(data.get("objectives", DEFAULT_OBJECTIVES), at(source, "objectives")),
        sampler=_settings(SamplerSettings, data.get("sampler") or {}, at(source, "sampler")),
        resources=_resources(data.get("resources") or {}, at(source, "resources")),
        failure=_settings(FailurePolicy, data.get("failure") or {}, at(source, "failure")),
        device=_device(data.get("device", "auto"), at(source, "device")),
        source=source,
        plugins=plugins,
    )


def _plugins(raw: Any, where: str) -> list[str]:
    """Import the modules that register a researcher's own components, before any name is checked
    (the sweep imports them again in every worker)."""
    if not isinstance(raw, list):
        raise InvalidValue(where, raw, "expected a list of importable module names")
    for i, module in enumerate(raw):
        if not isinstance(module, str) or not module:
            raise InvalidValue(at(where, i), module, "expected a module name, e.g. my_defenses")
        try:
            importlib.import_module(module)
        except Exception as err:  # any failure of a user's module, reported on one line
            reason = " ".join(f"{type(err).__name__}: {err}".split())
            raise InvalidValue(at(where, i), module, f"cannot be imported ({reason})") from None
    return list(raw)


# --- phase 1: attack cells --------------------------------------------------------------------------


def _datasets(raw: Any, where: str) -> list[tuple[str, list[dict[str, Any]], str | None]]:
    from trials.data import DATASETS, SplitParams, make_dataset

    out = []
    for i, entry in enumerate(_nonempty_list(raw, where)):
        loc = at(where, i)
        entry = _entry(entry, loc, DATASET_KEYS)
        name = _registered(DATASETS, entry["name"], at(loc, "name"))
        root = entry.get("root")
        if root is not None and not isinstance(root, str):
            raise InvalidValue(at(loc, "root"), root, "expected a path (string)")
        cls = DATASETS.get(name)
        params_cls = [SplitParams, cls.Params]
        points = expand_grid(params_cls, entry.get("params") or {}, at(loc, "params"), f"dataset {name}")
        for point in points:
            with located(at(loc, "params"), keep_field=True):
                make_dataset(name, point, root)
        out.append((name, points, root))
    return out


def _models(raw: Any, where: str) -> list[str]:
    from trials.models import MODELS

    return [_registered(MODELS, m, at(where, i)) for i, m in enumerate(_nonempty_list(raw, where))]


def _attacks(raw: Any, where: str) -> list[tuple[str, list[dict[str, Any]]]]:
    from trials.attacks import ATTACKS

    out = []
    for i, entry in enumerate(_nonempty_list(raw, where)):
        loc = at(where, i)
        entry = _entry(entry, loc, ATTACK_KEYS)
        name = _registered(ATTACKS, entry["name"], at(loc, "name"))
        points = expand_grid(
            [ATTACKS.get(name).Params], entry.get("params") or {}, at(loc, "params"), f"attack {name}"
        )
        out.append((name, points))
    return out


def _attack_cells(
    datasets: list[tuple[str, list[dict[str, Any]], str | None]],
    models: list[str],
    attacks: list[tuple[str, list[dict[str, Any]]]],
    seeds: list[int],
    training: dict[str, Any],
    source: str,
) -> list[AttackCell]:
    cells: list[AttackCell] = []
    seen: set[str] = set()
    dataset_axis = [(name, point, root) for name, points, root in datasets for point in points]
    attack_axis = [(name, point) for name, points in attacks for point in points]
    for (dataset, dataset_params, root), model, (attack, attack_params), seed in itertools.product(
        dataset_axis, models, attack_axis, seeds
    ):
        cell = AttackCell(dataset, dataset_params, root, model, attack, attack_params, seed, dict(training))
        key = cell.key
        if key in seen:
            raise InvalidValue(
                at(source, "attacks"),
                cell.label,
                "each attacked model may appear once, and this one appears twice (check datasets, "
                "models, attacks and seeds for duplicates, defaults included)",
            )
        seen.add(key)
        cells.append(cell)
    return cells


def _training(raw: Any, where: str) -> dict[str, Any]:
    from trials.training import TrainRecipe

    raw = _mapping(raw, where, [f.name for f in dataclasses.fields(TrainRecipe)])
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None and name == "epochs":
            continue  # the dataset's recipe
        with located(at(where, name)):
            out[name] = as_dict(resolve_params(TrainRecipe, {name: value}, owner="attack_training"))[name]
    return out


def _seeds(raw: Any, where: str) -> list[int]:
    seeds = _nonempty_list(raw, where)
    for i, seed in enumerate(seeds):
        _whole(seed, at(where, i), 0)
        if seed in seeds[:i]:
            raise InvalidValue(at(where, i), seed, "each seed may appear once")
    return list(seeds)


# --- phase 2: defenses ------------------------------------------------------------------------------


def _defenses(raw: Any, defaults: dict[str, Any], source: str) -> list[DefenseEntry]:
    from trials.defenses import DEFENSES

    where = at(source, "defenses")
    out: list[DefenseEntry] = []
    for i, entry in enumerate(_nonempty_list(raw, where)):
        loc = at(where, i)
        entry = _entry(entry, loc, DEFENSE_KEYS)
        name = _registered(DEFENSES, entry["name"], at(loc, "name"))
        if any(d.name == name for d in out):
            raise InvalidValue(
                at(loc, "name"),
                name,
                "each defense may appear once (search several configurations in its space)",
            )
        out.append(_defense(name, entry, defaults, loc, source))
    return out


def _defense(
    name: str, entry: dict[str, Any], defaults: dict[str, Any], loc: str, source: str
) -> DefenseEntry:
    def setting(key: str, fallback: Any) -> tuple[Any, str]:
        """The entry's value, else the `defaults:` one, else the fallback; with where it was written."""
        if key in entry:
            return entry[key], at(loc, key)
        if key in defaults:
            return defaults[key], at(at(source, "defaults"), key) + f" (for {loc.split(': ', 1)[-1]})"
        return fallback, at(loc, key)

    preset = _preset(name, *setting("preset", None))
    fixed = _fixed(name, entry.get("fixed") or {}, at(loc, "fixed"))
    space_raw, space_at = setting("space", "default")
    space, space_source = _space(name, space_raw, space_at, fixed, at(loc, "fixed"))
    if "trials" in entry and "study" in entry:
        raise InvalidValue(at(loc, "study"), entry["study"], "a defense entry is a search (trials) or a study, not both")
    study_raw, study_at = setting("study", None)
    if "trials" in entry:
        study_raw = None  # the entry's own search wins over a `defaults:` study
    defense = DefenseEntry(name, preset, fixed, space, 1, space_source)
    if study_raw is not None:
        study = _study(defense, study_raw, study_at)
        from bdlab.designs import configuration_count

        trials = configuration_count(space, study) * study.points_per_configuration
        defense = dataclasses.replace(defense, trials=trials, study=study)
    else:
        trials, trials_at = setting("trials", DEFAULT_TRIALS)
        _whole(trials, trials_at, 1, " (trials per defense cell, default config included)")
        if not space:
            if "trials" in entry and trials > 1:
                raise InvalidValue(trials_at, trials, "an empty space runs only the default configuration: 1")
            trials = 1
        defense = dataclasses.replace(defense, trials=trials)
    _check_default_config(defense, loc)
    return defense


def _study(defense: DefenseEntry, raw: Any, where: str) -> StudyDesign:
    """A `study:` mapping: its keys typed by `StudyDesign`, then what depends on the defense."""
    from trials.defenses import DEFENSES

    study = _settings(StudyDesign, raw, where)
    raw = dict(raw)
    if not defense.space and "configurations" in raw and study.configurations > 1:
        raise InvalidValue(
            at(where, "configurations"), study.configurations, "an empty space has only the default configuration: 1"
        )
    if not study.seeds:
        raise InvalidValue(at(where, "seeds"), study.seeds, "at least one defense seed")
    for key, values in (("seeds", study.seeds), ("budgets", study.budgets)):
        for i, value in enumerate(values):
            if value in values[:i]:
                raise InvalidValue(at(at(where, key), i), value, "each value may appear once")
    if study.budgets:
        kind = DEFENSES.get(defense.name).data_kind
        if kind not in ("unlabeled", "clean_labeled"):
            raise InvalidValue(
                at(where, "budgets"),
                list(study.budgets),
                f"defense {defense.name} takes no held-out data ({kind}): budgets apply to defenses that do",
            )
        searched = [k for k in ("data_fraction", "data_count") if k in defense.space]
        if searched:
            raise InvalidValue(
                at(where, "budgets"), list(study.budgets), f"{searched[0]} is searched by the space: drop one"
            )
    return study


def _preset(name: str, preset: Any, where: str) -> str | None:
    from trials.presets import available_presets

    if preset is not None and preset not in available_presets(name):
        allowed = ", ".join(available_presets(name)) or "none"
        raise InvalidValue(where, preset, f"presets of {name}: {allowed} (trials/defenses/presets/{name}.yaml)")
    return preset


def _fixed(name: str, raw: Any, where: str) -> dict[str, Any]:
    from trials.defenses import DEFENSES

    params_cls = DEFENSES.get(name).Params
    fields = params_cls.__dataclass_fields__
    fixed: dict[str, Any] = {}
    for key, value in _mapping(raw, where, None).items():
        if key not in fields:
            raise InvalidValue(where, key, f"defense {name} has the parameters: {', '.join(sorted(fields))}")
        with located(at(where, key)):
            fixed[key] = as_dict(resolve_params(params_cls, {key: value}, owner=f"defense {name}"))[key]
    return fixed


def _space(
    name: str, raw: Any, where: str, fixed: dict[str, Any], fixed_at: str
) -> tuple[dict[str, Distribution], str]:
    """(space, source): the default file minus the fixed params, none, or an inline mapping."""
    if raw == "default":
        return {k: dist for k, dist in load_space(name).items() if k not in fixed}, "default"
    if raw == "none" or raw is None:
        return {}, "none"
    if not isinstance(raw, Mapping):
        raise InvalidValue(where, raw, "default, none, or a mapping param -> distribution")
    space = parse_space(name, raw, where)
    both = [k for k in space if k in fixed]
    if both:
        raise InvalidValue(fixed_at, both[0], "searched by the space (inline) and fixed at once")
    return space, "inline"


def _check_default_config(defense: DefenseEntry, loc: str) -> None:
    """Resolve the default configuration (preset + fixed) through the defense, so a bad combination
    fails now rather than in a trial. (It need not be a point of the space: the study records the
    values the space can hold; the shipped default spaces hold the paper defaults and the presets.)"""
    from trials.run import DefenseSpec, resolve_defense

    with located(loc, keep_field=True):
        resolve_defense(DefenseSpec(defense.name, defense.default_params()))


# --- study settings ---------------------------------------------------------------------------------


def _objectives(raw: Any, where: str) -> dict[str, str]:
    from trials.metrics import defense_metric_keys

    raw = _mapping(raw, where, None)
    if not raw:
        raise InvalidValue(where, raw, "at least one metric: direction, e.g. {acc: max, asr: min}")
    for metric, direction in raw.items():
        if metric not in defense_metric_keys():
            raise InvalidValue(where, metric, f"metrics: {', '.join(defense_metric_keys())}")
        if direction not in DIRECTIONS:
            raise InvalidValue(at(where, metric), direction, "max or min")
    return dict(raw)


def _settings(cls: type, raw: Any, where: str) -> Any:
    """A sweep-wide settings block (a dataclass of `param` fields) from its mapping: unknown keys,
    types and ranges are checked by the fields themselves."""
    raw = _mapping(raw, where, [f.name for f in dataclasses.fields(cls)])
    for key, value in raw.items():
        with located(at(where, key)):
            resolve_params(cls, {key: value}, owner=where)
    return resolve_params(cls, raw, owner=where)


def _resources(raw: Any, where: str) -> Resources:
    raw = _mapping(raw, where, [f.name for f in dataclasses.fields(Resources)])
    phases = {}
    for phase, value in raw.items():
        phases[phase] = _settings(TrialResources, value or {}, at(where, phase))
    return Resources(**phases)


def _device(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not DEVICE_PATTERN.fullmatch(raw):
        raise InvalidValue(where, raw, "auto, cpu, cuda or cuda:N")
    return raw


# --- helpers ----------------------------------------------------------------------------------------


def _mapping(
    raw: Any, where: str, keys: Any, required: tuple[str, ...] = (), what: str = "a mapping"
) -> dict:
    """`raw` as a dict; with `keys`, unknown keys are errors listing the valid ones."""
    raw = mapping(raw, where, what)
    if keys is not None:
        for key in raw:
            if key not in keys:
                raise InvalidValue(where, key, f"valid keys: {', '.join(keys)}")
    for key in required:
        if key not in raw:
            raise InvalidValue(where, f"(no {key})", f"required keys: {', '.join(required)}")
    return raw


def _whole(value: Any, where: str, low: int, what: str = "") -> int:
    """An integer >= `low` (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidValue(where, value, f"expected an integer >= {low}{what}")
    return value


def _nonempty_list(raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise InvalidValue(where, raw, "expected a non-empty list")
    return raw


def _entry(raw: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A list entry: a bare name or a mapping with `name`."""
    if isinstance(raw, str):
        return {"name": raw}
    return _mapping(raw, where, keys, ("name",), what="a name or a mapping")


def _registered(registry: Any, name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in registry:
        raise InvalidValue(where, name, f"registered {registry.family}s: {', '.join(registry.names())}")
    return name
