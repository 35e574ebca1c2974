"""The sweep spec's data model: what a validated sweep file becomes (`bdlab.spec.reader` builds it).

Phase 1 of a sweep trains one attacked model per `AttackCell` (datasets x models x attack grid points x
seeds); phase 2 runs one Optuna study per `DefenseCell` (attack cell x `DefenseEntry`). The sweep-wide
settings (`SamplerSettings`, `Resources`, `FailurePolicy`) are typed like the components' parameters
(`trials.params.param`): their defaults and allowed values are declared once, here, and the reader
checks a spec against them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from trials.params import as_dict, param, resolve_params

SAMPLERS = ("tpe", "random", "gp", "nsga2")
DESIGNS = ("sobol", "grid")
DIRECTIONS = ("max", "min")


# --- sweep-wide settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSettings:
    name: Literal["tpe", "random", "gp", "nsga2"] = param("tpe", "Optuna sampler of every study")
    seed: int = param(0, "seed of the samplers (each study's is derived from it and the study's name)", low=0)


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for. Fractional GPUs pack several trials on one GPU."""

    cpu: float = param(1.0, "CPUs (also the trial's torch threads)", low=0.0, low_exclusive=True)
    gpu: float = param(0.0, "GPUs: 0, a fraction below 1 (a shared GPU), or a whole number")

    def __post_init__(self) -> None:
        if self.gpu < 0 or (self.gpu > 1 and not float(self.gpu).is_integer()):
            from trials.errors import InvalidValue

            raise InvalidValue("gpu", self.gpu, "0, a fraction below 1 (a shared GPU), or a whole number")

    def as_ray(self) -> dict[str, float]:
        return {"cpu": float(self.cpu), "gpu": float(self.gpu)}


@dataclass(frozen=True)
class Resources:
    attack: TrialResources = field(default_factory=TrialResources)
    defense: TrialResources = field(default_factory=TrialResources)


@dataclass(frozen=True)
class FailurePolicy:
    max_retries: int = param(1, "times a failed trial is retried (Ray's max_failures)", low=0)


@dataclass(frozen=True)
class StudyDesign:
    """A defense entry's `study:`: a space-filling design over the defense's space, crossed with
    defense seeds, clean-data budgets and random subsets of the held-out data (docs/spec.md
    "Studies"). Every point of the cross product is one ordinary trial of the cell's study."""

    design: Literal["sobol", "grid"] = param("sobol", "sobol (scrambled, seeded Sobol points) or grid")
    configurations: int = param(8, "configurations of the defense's space, the default one included", low=1)
    seeds: list[int] = param([0], "defense seeds, each configuration runs with every one", low=0)
    budgets: list[float] = param(
        [], "clean-data budgets (data_fraction values; [] = the configuration's own)", low=0.0, high=1.0,
        low_exclusive=True,
    )
    subsets: int = param(1, "random subsets of the held-out data drawn per budget", low=1)

    @property
    def points_per_configuration(self) -> int:
        return len(self.seeds) * max(1, len(self.budgets)) * self.subsets


# --- cells ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackCell:
    """One attacked model to train (or reuse): dataset x model x attack params x seed.

    `dataset_params` and `attack_params` hold only the values the spec sets (typed); `identity()`
    fills in every default, and `key` is the content address built from it.
    """

    dataset: str
    dataset_params: dict[str, Any]
    data_root: str | None
    model: str
    attack: str
    attack_params: dict[str, Any]
    seed: int
    training: dict[str, Any]  # TrainRecipe overrides; "epochs" among them

    def attack_spec(self, device: str = "auto") -> Any:
        from trials.run import AttackSpec

        recipe = {k: v for k, v in self.training.items() if k != "epochs"}
        return AttackSpec(
            dataset=self.dataset,
            model=self.model,
            attack=self.attack,
            attack_params=dict(self.attack_params),
            dataset_params=dict(self.dataset_params),
            data_root=self.data_root,
            seed=self.seed,
            epochs=self.training.get("epochs"),
            recipe=recipe,
            device=device,
        )

    def identity(self) -> dict[str, Any]:
        """Fully explicit, JSON-able description (every default filled in, keys sorted): what the
        attacked model depends on, for cache keys. Laid out like the `spec.yaml` of `bdlab attack`."""
        from trials.attacks import ATTACKS
        from trials.data import resolve_dataset_params
        from trials.run import resolve_recipe

        split, own = resolve_dataset_params(self.dataset, self.dataset_params)
        attack_params = resolve_params(ATTACKS.get(self.attack).Params, self.attack_params, owner="attack")
        return _sorted(
            {
                "dataset": {
                    "name": self.dataset,
                    "params": {**as_dict(split), **as_dict(own)},
                    "root": self.data_root,
                },
                "model": self.model,
                "attack": {"name": self.attack, "params": as_dict(attack_params)},
                "seed": self.seed,
                "recipe": as_dict(resolve_recipe(self.attack_spec())),
            }
        )

    @functools.cached_property
    def key(self) -> str:
        """The attacked model's content address (its identity and the code that trains it)."""
        from bdlab.cache import cache_key

        return cache_key(self.identity())

    @property
    def label(self) -> str:
        """Short and human: `digits/mini_resnet/badnets(ratio=0.05)/s0`."""
        return (
            f"{self.dataset}{params_label(self.dataset_params)}/{self.model}/"
            f"{self.attack}{params_label(self.attack_params)}/s{self.seed}"
        )


@dataclass(frozen=True)
class DefenseEntry:
    """One defense of the sweep: its default configuration (preset + fixed) and its search space."""

    name: str
    preset: str | None
    fixed: dict[str, Any]
    space: dict[str, Any]  # param -> bdlab.spaces distribution
    trials: int  # per defense cell, the default configuration included (a study: its points)
    space_source: str = "inline"  # "default" (the defense's space file), "none" or "inline"
    study: StudyDesign | None = None  # a study cell (a design over the space) instead of a search

    def default_params(self) -> dict[str, Any]:
        """Preset values merged with `fixed`: the full override dict of the default trial (what
        `DefenseSpec.params` gets with `preset=None`). A trial's params are this updated with the
        sampled values."""
        from trials.presets import load_preset

        return {**(load_preset(self.name, self.preset) if self.preset else {}), **self.fixed}


@dataclass(frozen=True)
class DefenseCell:
    """One Optuna study: a defense searched on one attacked model."""

    attack: AttackCell
    defense: DefenseEntry

    @property
    def label(self) -> str:
        return f"{self.attack.label} :: {self.defense.name}"


@dataclass(frozen=True)
class SweepSpec:
    name: str
    attack_cells: list[AttackCell]
    defenses: list[DefenseEntry]
    objectives: dict[str, str]  # metric -> "max" | "min", in order (the study's directions)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    resources: Resources = field(default_factory=Resources)
    failure: FailurePolicy = field(default_factory=FailurePolicy)
    device: str = "auto"
    source: str = "<inline>"
    plugins: list[str] = field(default_factory=list)  # modules registering extra components

    def defense_cells(self) -> list[DefenseCell]:
        """Attack cells x defenses, in spec order."""
        return [DefenseCell(a, d) for a in self.attack_cells for d in self.defenses]

    @property
    def trial_count(self) -> int:
        return sum(d.trials for d in self.defenses) * len(self.attack_cells)


# --- labels -------------------------------------------------------------------------------------------


def params_label(params: Mapping[str, Any]) -> str:
    """`(ratio=0.05,size=3)`, or "" for no parameters."""
    if not params:
        return ""
    return "(" + ",".join(f"{k}={_short(params[k])}" for k in sorted(params)) + ")"


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sorted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value
