"""Study designs: the configurations of a study cell (a space-filling design over the defense's space)
and the cell's points (configurations x defense seeds x clean-data budgets x held-out subsets).

Configuration 0 is always the default configuration (preset + fixed, the untuned result); the
others are points of the space, deterministic from the spec:

- `sobol`: N - 1 points of a scrambled Sobol sequence (scipy.stats.qmc), seeded by the sampler seed
  and the cell's label, each coordinate u in [0, 1) mapped onto its distribution (`from_unit`);
- `grid`: the product of L_p levels per parameter p, level i at u = (i + 0.5) / L_p (the centres of
  L_p equal cells, mapped like a Sobol coordinate). The levels are raised one at a time, round-robin
  over the parameters in space order, while the product stays <= N - 1; a choice or int parameter
  never gets more levels than it has values. So a grid holds 1 + (at most N - 1) configurations.

docs/spec.md "Studies" describes the keys and what a study trial is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bdlab.spaces import ChoiceDist, Distribution, FloatDist, IntDist
from bdlab.spec.model import StudyDesign
from trials.device import derive_seed


@dataclass(frozen=True)
class StudyPoint:
    """One trial of a study cell."""

    configuration: int  # 0: the default configuration
    values: dict[str, Any] | None  # the searched parameters' values (None: the default configuration)
    seed: int  # the defense seed
    budget: float | None  # data_fraction of the held-out data (None: the configuration's own)
    subset: int  # which random subset of the held-out data


def from_unit(dist: Distribution, u: float) -> Any:
    """A coordinate u in [0, 1) as a value of `dist`: float linear or log (rounded to its step),
    int by equal shares of its values (log: on the log scale, rounded to its step), choice by index."""
    u = min(max(float(u), 0.0), math.nextafter(1.0, 0.0))
    if isinstance(dist, ChoiceDist):
        value = dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
        return list(value) if isinstance(value, tuple) else value
    if isinstance(dist, IntDist):
        count = (dist.high - dist.low) // dist.step + 1
        if dist.log:
            x = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
            k = round((x - dist.low) / dist.step)
        else:
            k = int(u * count)
        return int(dist.low + min(max(k, 0), count - 1) * dist.step)
    assert isinstance(dist, FloatDist)
    if dist.log:
        x = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    else:
        x = dist.low + u * (dist.high - dist.low)
    if dist.step is not None:
        top = math.floor((dist.high - dist.low) / dist.step + 1e-9)
        x = dist.low + min(max(round((x - dist.low) / dist.step), 0), top) * dist.step
        x = round(x, 12)
    return float(min(max(x, dist.low), dist.high))


def value_count(dist: Distribution) -> float:
    """How many distinct values a parameter holds (a float: unbounded)."""
    if isinstance(dist, ChoiceDist):
        return len(dist.choices)
    if isinstance(dist, IntDist):
        return (dist.high - dist.low) // dist.step + 1
    if dist.step is not None:
        return math.floor((dist.high - dist.low) / dist.step + 1e-9) + 1
    return math.inf


def grid_levels(space: Mapping[str, Distribution], target: int) -> list[int]:
    """Levels per parameter (space order): raised one at a time, round-robin, while the product
    stays <= target and each stays <= the parameter's number of values."""
    dists = list(space.values())
    levels = [1] * len(dists)
    if target < 1 or not dists:
        return levels
    grew = True
    while grew:
        grew = False
        for i, dist in enumerate(dists):
            product = math.prod(levels)
            if levels[i] + 1 <= value_count(dist) and product // levels[i] * (levels[i] + 1) <= target:
                levels[i] += 1
                grew = True
    return levels


def configurations(
    space: Mapping[str, Distribution], design: StudyDesign, seed: int, label: str
) -> list[dict[str, Any] | None]:
    """The study's configurations: None (the default configuration) first, then the design's
    points of the space as param -> value (deterministic for the sampler seed and the cell label)."""
    out: list[dict[str, Any] | None] = [None]
    names = list(space)
    if not names or design.configurations <= 1:
        return out
    wanted = design.configurations - 1
    if design.design == "grid":
        axes = [[(i + 0.5) / n for i in range(n)] for n in grid_levels(space, wanted)]
        units: list[tuple[float, ...]] = list(itertools.product(*axes))
    else:
        from scipy.stats import qmc

        sobol = qmc.Sobol(d=len(names), scramble=True, seed=derive_seed(seed, "design", label))
        units = [tuple(row) for row in sobol.random_base2(max(0, math.ceil(math.log2(wanted))))[:wanted]]
    for unit in units:
        out.append({n: from_unit(space[n], u) for n, u in zip(names, unit, strict=True)})
    return out


def configuration_count(space: Mapping[str, Distribution], design: StudyDesign) -> int:
    """How many configurations `configurations` returns (without drawing them)."""
    if not space or design.configurations <= 1:
        return 1
    if design.design == "grid":
        return 1 + math.prod(grid_levels(space, design.configurations - 1))
    return design.configurations


def study_points(
    space: Mapping[str, Distribution], design: StudyDesign, seed: int, label: str
) -> list[StudyPoint]:
    """Configurations x defense seeds x budgets x subsets, in that nesting order (trial k of the
    study is point k: a resumed study runs the points from the first it has not asked)."""
    budgets: list[float | None] = list(design.budgets) or [None]
    return [
        StudyPoint(c, values, s, b, k)
        for c, values in enumerate(configurations(space, design, seed, label))
        for s in design.seeds
        for b in budgets
        for k in range(design.subsets)
    ]


def subset_seed(attack_seed: int, subset: int) -> int:
    """The seed of held-out subset `subset` of a study cell: the same for every configuration,
    defense seed and budget of the cell (a smaller budget takes a prefix of the same permutation,
    so the subsets are nested), and independent of the defense seed."""
    return derive_seed(attack_seed, "defense-data", "subset", str(subset))
