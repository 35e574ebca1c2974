"""The analysis of a robustness study: pure functions of a sweep's trial rows.

A row is one defense trial, as `bdlab.report.trial_rows` returns it and the sweep's Parquet table
stores it (`load_rows` reads the table back): `attack`, `defense`, `cell`, `trial`,
`default_config`, `params` (a JSON object), `status`, the report half's metrics (`acc`, `asr`,
`der`, ...), the validation half's (`val_acc`, `val_asr`, ...) and the backdoored model's report-half
`before_acc` and `before_asr`. Every figure here is computed from the report half, except what a
defender chooses with (`defender_choice`), which never looks at it. docs/analysis.md gives the
definitions and the papers they follow.

Nothing here reads files beyond `load_rows`, draws unseeded random numbers or imports torch: the same
rows give the same numbers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

Row = Mapping[str, Any]
RowKey = str | Sequence[str] | Callable[[Row], Hashable]
Target = str | Callable[[Row], float]

# metrics where lower is better; every other known metric is better higher (`_direction`)
_LOWER_IS_BETTER = ("asr", "acc_drop", "penultimate_shift")
_HIGHER_IS_BETTER = ("acc", "der", "ra")
# a value within this of a bound is within it: 0.90 - 0.88 is 0.020000000000000018 in floats, and an
# ACC drop of 2 points must pass a 2-point bound
TOLERANCE = 1e-9


# --- rows ------------------------------------------------------------------------------------------


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep's Parquet table (`bdlab export`, or `results/<sweep>.parquet`)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def params_of(row: Row) -> dict[str, Any]:
    """The parameters a trial ran with (the row's `params`, a JSON object, decoded)."""
    params = row.get("params")
    if params is None:
        return {}
    return json.loads(params) if isinstance(params, str) else dict(params)


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (missing, NaN, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def acc_drop(row: Row) -> float | None:
    """The accuracy a defense cost: `before_acc - acc` (report half; negative when it gained some)."""
    before, after = _number(row.get("before_acc")), _number(row.get("acc"))
    return None if before is None or after is None else before - after


def metric(row: Row, name: str) -> float | None:
    """A row's metric `name` as a finite float, or None; `acc_drop` is derived (`acc_drop`)."""
    return acc_drop(row) if name == "acc_drop" else _number(row.get(name))


def is_complete(row: Row) -> bool:
    """A trial that finished with report-half `acc`, `asr` and the backdoored model's `before_acc`."""
    return row.get("status") == "complete" and all(
        _number(row.get(k)) is not None for k in ("acc", "asr", "before_acc")
    )


def complete_rows(rows: Iterable[Row]) -> list[Row]:
    """The complete trials of `rows` (`is_complete`), in their order."""
    return [r for r in rows if is_complete(r)]


def group_rows(rows: Iterable[Row], by: RowKey = "cell") -> dict[Hashable, list[Row]]:
    """`rows` grouped by one column, several (the key is then a tuple) or a function of the row;
    groups in order of first appearance."""
    key = _key_function(by)
    groups: dict[Hashable, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _key_function(by: RowKey) -> Callable[[Row], Hashable]:
    if callable(by):
        return by
    if isinstance(by, str):
        return lambda row: row.get(by)
    columns = tuple(by)
    return lambda row: tuple(row.get(c) for c in columns)


def _one_cell(rows: Sequence[Row], what: str) -> None:
    cells = {r.get("cell") for r in rows}
    if len(cells) > 1:
        raise ValueError(
            f"{what} compares the configurations of one cell; these rows are of {len(cells)} cells "
            f"(group them with group_rows(rows, 'cell') first)"
        )


# --- DER -------------------------------------------------------------------------------------------


def defense_effectiveness_rating(before_acc: float, acc: float, before_asr: float, asr: float) -> float:
    """FT-SAM's defense effectiveness rating (Zhu et al., ICCV 2023), the formula of `der` in
    `trials.metrics`: `[max(0, before_asr - asr) - max(0, before_acc - acc) + 1] / 2`.

    0.5 is no change, 1 an ASR of 1 removed at no accuracy cost, 0 all accuracy lost and no ASR
    removed; a gain in accuracy or a rise in ASR counts as zero. Use it to rate a row against
    another reference than the row's own backdoored model (`row_der` uses the row's)."""
    return (max(0.0, before_asr - asr) - max(0.0, before_acc - acc) + 1) / 2


def row_der(row: Row) -> float | None:
    """A row's DER from its report-half `acc`, `asr`, `before_acc` and `before_asr` (what the
    stored `der` column holds); None where one of them is missing."""
    values = [_number(row.get(k)) for k in ("before_acc", "acc", "before_asr", "asr")]
    if any(v is None for v in values):
        return None
    return defense_effectiveness_rating(*values)  # type: ignore[arg-type]


# --- collapse and success --------------------------------------------------------------------------


COLLAPSE_MARGIN = 0.05  # how far above chance (absolute) an accuracy still counts as collapsed


def collapsed(
    acc: float | Sequence[float] | np.ndarray, num_classes: int, margin: float = COLLAPSE_MARGIN
) -> Any:
    """Whether a model's clean accuracy is near chance: `acc <= 1 / num_classes + margin`.

    A collapsed model predicts (nearly) one class for everything; its low ASR means nothing (it also
    "resists" the trigger of every class but one), so `success_rate` and `oracle_choice` leave such
    trials out unless asked. `margin` is absolute (0.05: 15 % ACC on a 10-class problem).

    Args:
        acc: one accuracy (a fraction) or a sequence of them.
        num_classes: the classifier's number of classes (10 for CIFAR-10 and digits).
        margin: how far above chance still counts as collapsed.

    Returns:
        A bool for one accuracy, a boolean array for a sequence.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    flags = np.asarray(acc, dtype=float) <= 1.0 / num_classes + margin
    return bool(flags) if flags.ndim == 0 else flags


def _is_collapsed(row: Row, num_classes: int | None, margin: float) -> bool:
    return num_classes is not None and bool(collapsed(float(row["acc"]), num_classes, margin))


def _within(value: float | None, bound: float | None) -> bool:
    """`value <= bound` up to `TOLERANCE`; every value is within no bound (None)."""
    return bound is None or (value is not None and value <= bound + TOLERANCE)


def success_rate(
    rows: Iterable[Row],
    *,
    num_classes: int | None,
    max_asr: float | None = 0.05,
    max_acc_drop: float | None = 0.02,
    margin: float = 0.05,
    include_collapsed: bool = False,
) -> float:
    """The share of complete configurations that remove the backdoor at an acceptable cost: report
    `asr <= max_asr` and `before_acc - acc <= max_acc_drop` (both fractions: 2 points of accuracy
    is 0.02; None drops that criterion).

    This is the DHBE robustness study's question (Yan et al., AsiaCCS 2023, Fig. 3/8/10): how often
    does a configuration a defender might run actually work, rather than how well the best one does.
    A collapsed trial (`collapsed`, with `num_classes` and `margin`) stays in the denominator and
    never counts as a success, unless `include_collapsed`; `num_classes=None` turns the check off,
    and must be said explicitly. Failed and unfinished trials are left out of both counts.

    Returns:
        The share in [0, 1]; NaN when no row is complete.
    """
    done = complete_rows(rows)
    if not done:
        return float("nan")
    wins = 0
    for row in done:
        if not include_collapsed and _is_collapsed(row, num_classes, margin):
            continue
        wins += _within(float(row["asr"]), max_asr) and _within(acc_drop(row), max_acc_drop)
    return wins / len(done)


# --- bootstrap intervals ---------------------------------------------------------------------------


class Interval(NamedTuple):
    """A statistic and its bootstrap interval; unpacks as `(estimate, low, high)`."""

    estimate: float
    low: float
    high: float


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[..., Any] = np.median,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """The percentile bootstrap (Efron and Tibshirani, 1993) of `statistic` over `values`.

    `resamples` samples of `len(values)` values are drawn with replacement by a numpy Generator
    seeded with `seed`, the statistic is computed on each, and the interval is the
    `(1 - level) / 2` and `(1 + level) / 2` quantiles of those; the estimate is the statistic of
    `values` themselves. The same values and seed always give the same interval. `statistic` is
    called as `statistic(samples, axis=1)` on a 2-D array where it accepts `axis` (numpy's
    reductions do), else once per resample.

    A percentile bootstrap of the maximum (a worst case) can never exceed the largest value seen:
    its interval says how much the worst case rests on single runs, not what unseen runs could do.

    Returns:
        `Interval(estimate, low, high)`.
    """
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_interval needs finite values (drop missing ones first)")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, 1_000_000 // n)  # at most a million drawn values in memory at once
    stats = []
    for start in range(0, resamples, chunk):
        samples = x[rng.integers(0, n, size=(min(chunk, resamples - start), n))]
        stats.append(_row_statistic(statistic, samples))
    alpha = (1 - level) / 2
    low, high = np.quantile(np.concatenate(stats), [alpha, 1 - alpha])
    return Interval(float(statistic(x)), float(low), float(high))


def _row_statistic(statistic: Callable[..., Any], samples: np.ndarray) -> np.ndarray:
    try:
        out = np.asarray(statistic(samples, axis=1), dtype=float)
        if out.shape == (len(samples),):
            return out
    except TypeError:
        pass
    return np.array([float(statistic(s)) for s in samples])


def robustness_summary(
    rows: Iterable[Row],
    by: RowKey = ("attack", "defense"),
    *,
    num_classes: int | None,
    max_asr: float | None = 0.05,
    max_acc_drop: float | None = 0.02,
    margin: float = 0.05,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per group of complete rows (by default one per attack and defense, pooling whatever else
    varies: seeds, data subsets), the median and the worst case of the report ASR and of the ACC
    drop, each an `Interval` from `bootstrap_interval` (worst case: the maximum ASR and the maximum
    ACC drop), the median DER, and `success_rate` with the same thresholds.

    The statistics pool every row of a group; pass the rows of one configuration per seed or subset
    (each study's default trial, or each cell's `defender_choice`) for "the same defense, rerun".

    Returns:
        One dict per group, in order of first appearance: `group` (the key), `n` (complete rows),
        `collapsed` (how many, None without `num_classes`), `asr_median`, `asr_worst`,
        `acc_drop_median`, `acc_drop_worst`, `der_median` and `success_rate`.
    """
    out = []
    for group, members in group_rows(complete_rows(rows), by).items():
        asr = [float(r["asr"]) for r in members]
        drop = [acc_drop(r) for r in members]
        der = [d for d in (row_der(r) for r in members) if d is not None]
        boot = {"level": level, "resamples": resamples, "seed": seed}
        out.append(
            {
                "group": group,
                "n": len(members),
                "collapsed": None
                if num_classes is None
                else sum(_is_collapsed(r, num_classes, margin) for r in members),
                "asr_median": bootstrap_interval(asr, np.median, **boot),
                "asr_worst": bootstrap_interval(asr, np.max, **boot),
                "acc_drop_median": bootstrap_interval(drop, np.median, **boot),
                "acc_drop_worst": bootstrap_interval(drop, np.max, **boot),
                "der_median": bootstrap_interval(der, np.median, **boot) if der else None,
                "success_rate": success_rate(
                    members,
                    num_classes=num_classes,
                    max_asr=max_asr,
                    max_acc_drop=max_acc_drop,
                    margin=margin,
                ),
            }
        )
    return out


# --- the ACC-ASR trade-off: a logistic curve -------------------------------------------------------


@dataclass(frozen=True)
class LogisticFit:
    """`acc(asr) = height / (1 + exp(-steepness * (asr - midpoint))) + floor`.

    `floor` is the accuracy where the curve starts (k > 0: at ASR 0), `height` how much it gains
    over the sweep, `midpoint` the ASR of the half-way point, `steepness` how sharp the trade-off
    is (positive: accuracy rises with ASR, the usual trade-off of a defense swept from strong to
    weak). `flat` marks the fit of constant accuracies (height 0). Call it with ASR values.
    """

    height: float
    steepness: float
    midpoint: float
    floor: float
    flat: bool = False
    rmse: float = 0.0  # root mean squared residual of ACC over the fitted points

    def __call__(self, asr: float | Sequence[float] | np.ndarray) -> Any:
        return _logistic(np.asarray(asr, dtype=float), self.height, self.steepness, self.midpoint, self.floor)

    @property
    def params(self) -> dict[str, float]:
        """The four parameters by name."""
        return {
            "height": self.height,
            "steepness": self.steepness,
            "midpoint": self.midpoint,
            "floor": self.floor,
        }


def _logistic(x: np.ndarray, height: float, steepness: float, midpoint: float, floor: float) -> np.ndarray:
    # exp overflows to inf for large arguments, and height / inf = 0 is the right limit
    with np.errstate(over="ignore"):
        return height / (1.0 + np.exp(-steepness * (x - midpoint))) + floor


def fit_logistic(acc: Sequence[float] | np.ndarray, asr: Sequence[float] | np.ndarray) -> LogisticFit:
    """A logistic curve of ACC against ASR, fitted by least squares (scipy's `curve_fit`).

    The DHBE paper (Yan et al., AsiaCCS 2023, Fig. 3, 8 and 10) plots every run of a baseline whose
    learning rate is swept as one (ASR, ACC) point, with such a curve through them: a defense
    strong enough to remove the backdoor also costs accuracy. The parameterization is
    `acc = height / (1 + exp(-steepness * (asr - midpoint))) + floor` (`LogisticFit`), with
    `height >= 0` so that the sign of `steepness` alone gives the direction of the trade-off.

    Initial values come from the data (floor and height from the ACC range, the midpoint from the
    median ASR, the steepness from the direction of the ACC-ASR correlation); the fit is started from
    several steepnesses and midpoints and the best kept. Bounds keep the curve within the data's
    scale: the floor within one ACC range below the smallest ACC, the height at most three ACC ranges,
    the midpoint within one ASR range of the points, and |steepness| at most 500 per ASR range.

    Degenerate inputs: all ACC equal gives a flat fit (height 0, floor that ACC, `flat=True`);
    all ASR equal with varying ACC, fewer than 4 points (4 parameters) or non-finite values raise
    ValueError.

    Args:
        acc: the runs' clean accuracies.
        asr: their attack success rates, in the same order.

    Returns:
        The `LogisticFit`, which is callable on ASR values.
    """
    from scipy.optimize import curve_fit

    y = np.asarray(acc, dtype=float).ravel()
    x = np.asarray(asr, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"acc and asr differ in length ({y.size} and {x.size})")
    if x.size < 4:
        raise ValueError(f"a logistic curve has 4 parameters; {x.size} points cannot fix them")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("fit_logistic needs finite ACC and ASR values (drop missing ones first)")
    acc_span, asr_span = float(np.ptp(y)), float(np.ptp(x))
    if acc_span == 0:
        return LogisticFit(0.0, 0.0, float(np.median(x)), float(y[0]), flat=True)
    if asr_span == 0:
        raise ValueError("every point has the same ASR: ACC cannot be fitted as a function of ASR")
    lo, hi = float(y.min()), float(y.max())
    k_max = 500.0 / asr_span
    lower = [0.0, -k_max, float(x.min()) - asr_span, lo - acc_span]
    upper = [3 * acc_span, k_max, float(x.max()) + asr_span, hi]
    direction = 1.0 if np.corrcoef(x, y)[0, 1] >= 0 else -1.0
    best: tuple[float, np.ndarray] | None = None
    for k0 in (4.0, 10.0, 40.0):
        for m0 in np.quantile(x, [0.25, 0.5, 0.75]):
            start = [acc_span, direction * k0 / asr_span, float(m0), lo]
            try:
                popt, _ = curve_fit(_logistic, x, y, p0=start, bounds=(lower, upper), maxfev=20_000)
            except RuntimeError:  # no convergence from this start
                continue
            sse = float(np.sum((_logistic(x, *popt) - y) ** 2))
            if best is None or sse < best[0]:
                best = (sse, popt)
    if best is None:
        raise ValueError("the logistic fit did not converge from any starting point")
    sse, (height, steepness, midpoint, floor) = best
    return LogisticFit(
        float(height), float(steepness), float(midpoint), float(floor), rmse=math.sqrt(sse / x.size)
    )


# --- what a defender picks, and what it costs ------------------------------------------------------

DefenderRule = Literal["val_acc", "default"]


def defender_choice(rows: Iterable[Row], *, rule: DefenderRule = "val_acc") -> Row | None:
    """The configuration of one cell that a defender, who does not have the trigger, would keep.

    What a trial records that a defender could know: its parameters, whether it is the cell's default
    configuration (the paper's values), and its clean accuracy on the validation half (`val_acc`).
    Every ASR needs the attack's trigger, which a defender never has (docs/evaluation.md, rule 5),
    so `val_asr` is not used, nor is anything of the report half. `val_acc` stands for the clean
    accuracy a defender measures on clean labeled data of its own: it is the honest protocol's tuning
    set, disjoint from the report half that every figure comes from. (A data-free defender, DHBE or
    CLP, strictly has no labeled images; for it even this is an assumption: a small labeled set to
    validate on. `rule="default"` is the defender who does not tune at all.)

    Rules:

    - `"val_acc"`: the complete configuration with the highest `val_acc` (ties: the default
      configuration, then the lowest trial number). With nothing to measure the backdoor by, the
      clean accuracy is the only thing a defender can maximize; that this may keep a weak
      configuration is what `regret` measures (Qiu et al., 2022; the 2025 SoK on backdoor defense
      evaluation: hyperparameters selected on the attack's own success overstate a defense).
    - `"default"`: the cell's default configuration.

    Returns:
        The chosen row, or None when no complete row qualifies.
    """
    rows = list(rows)
    _one_cell(rows, "defender_choice")
    done = complete_rows(rows)
    if rule == "default":
        return next((r for r in done if r.get("default_config")), None)
    if rule != "val_acc":
        raise ValueError(f"unknown rule {rule!r}: 'val_acc' or 'default'")
    scored = [r for r in done if _number(r.get("val_acc")) is not None]
    if not scored:
        return None
    return min(scored, key=lambda r: (-float(r["val_acc"]), not r.get("default_config"), r.get("trial", 0)))


def oracle_choice(
    rows: Iterable[Row],
    *,
    num_classes: int | None,
    max_acc_drop: float | None = 0.02,
    margin: float = 0.05,
) -> Row | None:
    """The configuration of one cell that someone who sees the report half would keep: the lowest
    report `asr` among complete, non-collapsed configurations whose ACC drop is within
    `max_acc_drop` (ties: the smaller ACC drop, then the lowest trial number).

    This is the selection that tuning on the test set's ASR amounts to (Qiu et al., 2022; the 2025
    SoK on backdoor defense evaluation): the best the defense can do, not what a defender gets.

    Returns:
        The chosen row, or None when no configuration is within the bound.
    """
    rows = list(rows)
    _one_cell(rows, "oracle_choice")
    admissible = []
    for row in complete_rows(rows):
        if _is_collapsed(row, num_classes, margin) or not _within(acc_drop(row), max_acc_drop):
            continue
        admissible.append(row)
    if not admissible:
        return None
    return min(admissible, key=lambda r: (float(r["asr"]), acc_drop(r), r.get("trial", 0)))


@dataclass(frozen=True)
class Regret:
    """What the defender's choice costs against the oracle's, on the report half."""

    asr: float  # defender's ASR - oracle's ASR (how much backdoor the defender leaves in)
    acc_drop: float  # defender's ACC drop - oracle's ACC drop (negative: the defender kept more accuracy)
    defender: Row
    oracle: Row


def regret(
    rows: Iterable[Row],
    *,
    num_classes: int | None,
    rule: DefenderRule = "val_acc",
    max_acc_drop: float | None = 0.02,
    margin: float = 0.05,
) -> Regret | None:
    """The regret of selecting without the trigger, for one cell: the report ASR of
    `defender_choice` (with `rule`) minus that of `oracle_choice` (with `max_acc_drop`), and the
    same difference of their ACC drops.

    The ASR regret is 0 when the defender happens to pick the oracle's configuration. It can be
    negative, when the defender's choice removes more backdoor by exceeding the ACC bound that the
    oracle kept to; the ACC drop regret then shows the price.

    Returns:
        A `Regret`, or None when either choice does not exist.
    """
    rows = list(rows)
    mine = defender_choice(rows, rule=rule)
    best = oracle_choice(rows, num_classes=num_classes, max_acc_drop=max_acc_drop, margin=margin)
    if mine is None or best is None:
        return None
    return Regret(
        asr=float(mine["asr"]) - float(best["asr"]),
        acc_drop=float(acc_drop(mine)) - float(acc_drop(best)),  # type: ignore[arg-type]
        defender=mine,
        oracle=best,
    )


# --- hyperparameters: importance and sensitivity ---------------------------------------------------


def _direction(target: Target, direction: str | None) -> str:
    if direction is not None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        return direction
    if isinstance(target, str):
        name = target.removeprefix("val_").removeprefix("before_")
        if name.startswith(_LOWER_IS_BETTER):
            return "minimize"
        if name in _HIGHER_IS_BETTER:
            return "maximize"
    raise ValueError(f"say whether {target!r} is to be maximized or minimized (direction=...)")


def _target_function(target: Target) -> Callable[[Row], float | None]:
    if callable(target):
        return lambda row: _number(target(row))
    return lambda row: metric(row, target)


def infer_distributions(rows: Iterable[Row], param_names: Sequence[str]) -> dict[str, Any]:
    """Optuna distributions covering the values `rows` ran with, for each of `param_names` that
    varies: numbers as ranges (integers as `IntDistribution`; floats as `FloatDistribution`, on a log
    scale where all are positive and span two decades or more, as learning rates are searched),
    anything else (strings, booleans, lists) as the categories seen (lists by their JSON text). A
    parameter with one value, or missing from every row, is left out.

    Pass distributions of your own to `hyperparameter_importance` where the searched space is known
    (fANOVA's importances depend on the space's measure)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    values: dict[str, list[Any]] = {name: [] for name in param_names}
    for row in rows:
        params = params_of(row)
        for name in param_names:
            if name in params:
                values[name].append(_categorical_value(params[name]))
    out: dict[str, Any] = {}
    for name, seen in values.items():
        distinct = set(seen)
        if len(distinct) < 2:
            continue
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
            low, high = min(distinct), max(distinct)
            if all(isinstance(v, int) for v in distinct):
                out[name] = IntDistribution(int(low), int(high))
            else:
                out[name] = FloatDistribution(float(low), float(high), log=low > 0 and high / low >= 100)
        else:
            out[name] = CategoricalDistribution(sorted(distinct, key=repr))
    return out


def _categorical_value(value: Any) -> Any:
    """A parameter value Optuna can hold: lists and objects by their JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


def hyperparameter_importance(
    rows: Iterable[Row],
    param_names: Sequence[str],
    target: Target,
    *,
    direction: str | None = None,
    evaluator: Literal["ped_anova", "fanova"] | Any = "ped_anova",
    distributions: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """How much each searched parameter decides `target`, by Optuna's importance evaluators on an
    in-memory study of the complete rows.

    `"ped_anova"` is PED-ANOVA (Watanabe et al., IJCAI 2023): how differently a parameter is
    distributed among the best `target_quantile` (10 %) of trials than among all; `"fanova"` is
    functional ANOVA on a random forest (Hutter et al., ICML 2014), seeded with `seed`; or pass an
    Optuna evaluator. PED-ANOVA reads "best" as lowest, so a target to maximize (ACC, DER) is
    negated in the study; `direction` says which it is, and is inferred for the known metrics (`acc`,
    `der`, `ra` maximize; `asr...`, `acc_drop` minimize, `val_` and `before_` prefixes allowed).

    Args:
        rows: the trials of one cell (the importance of a parameter is a property of one search).
        param_names: the searched parameters (names in the rows' `params`).
        target: a metric name (`metric`) or a function of a row.
        direction: "maximize" or "minimize"; None infers it for known metric names.
        evaluator: "ped_anova", "fanova" or an `optuna.importance` evaluator.
        distributions: the parameters' Optuna distributions; default `infer_distributions`.
        seed: fANOVA's random-forest seed.

    Returns:
        `{param: importance}` over `param_names`, normalized to sum to 1 (0 for a parameter that
        never varies), most important first. Only complete rows with every varying parameter and a
        finite target are used.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    sign = -1.0 if _direction(target, direction) == "maximize" else 1.0
    value_of = _target_function(target)
    rows = list(rows)
    _one_cell(rows, "hyperparameter_importance")
    done = complete_rows(rows)
    dists = dict(distributions) if distributions is not None else infer_distributions(done, param_names)
    dists = {k: v for k, v in dists.items() if k in param_names}
    if not dists:
        raise ValueError(f"none of {list(param_names)} varies across these rows")
    if evaluator == "ped_anova":
        evaluator = PedAnovaImportanceEvaluator()
    elif evaluator == "fanova":
        evaluator = FanovaImportanceEvaluator(seed=seed)
    elif isinstance(evaluator, str):
        raise ValueError(f"unknown evaluator {evaluator!r}: 'ped_anova', 'fanova' or an Optuna evaluator")
    trials = []
    for row in done:
        params = params_of(row)
        value = value_of(row)
        if value is None or not all(k in params for k in dists):
            continue
        chosen = {k: _categorical_value(params[k]) for k in dists}
        trials.append(optuna.trial.create_trial(params=chosen, distributions=dists, value=sign * value))
    if len(trials) < 2:
        raise ValueError(f"{len(trials)} usable trials: importance needs several")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory"
    try:
        study = optuna.create_study(direction="minimize")
        study.add_trials(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=list(dists))
    finally:
        optuna.logging.set_verbosity(verbosity)
    out = {name: float(found.get(name, 0.0)) for name in param_names}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def sensitivity(
    rows: Iterable[Row],
    param: str,
    *,
    metrics: Sequence[str] = ("acc", "asr"),
    max_levels: int = 8,
    bins: int = 5,
) -> list[dict[str, Any]]:
    """How the report metrics move with one searched parameter: per value of `param`, or per bin
    where it is numeric with more than `max_levels` distinct values, the count and the median,
    quartiles and extremes of each metric.

    Bins hold about equally many trials (edges at quantiles of the values seen, so a parameter
    sampled on a log scale gets log-like bins); a bin is `[low, high)`, the last one `[low, high]`.
    Only complete rows that ran with `param` count.

    Returns:
        One dict per value or bin, in increasing order: `value` (None for a bin), `low` and `high`
        (the value itself for a level), `n`, and for each metric `m`: `m_median`, `m_q1`, `m_q3`,
        `m_min` and `m_max` (the interquartile range is `m_q3 - m_q1`).
    """
    pairs = []
    for row in complete_rows(rows):
        params = params_of(row)
        if param in params:
            pairs.append((_categorical_value(params[param]), row))
    if not pairs:
        return []
    distinct = {v for v, _ in pairs}
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    groups: list[tuple[Any, Any, Any, list[Row]]] = []  # (value, low, high, rows)
    if numeric and len(distinct) > max_levels:
        xs = np.array([float(v) for v, _ in pairs])
        edges = np.unique(np.quantile(xs, np.linspace(0, 1, bins + 1)))
        for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            last = i == len(edges) - 2
            members = [
                r for v, r in pairs if low <= float(v) and (float(v) < high or (last and float(v) <= high))
            ]
            groups.append((None, float(low), float(high), members))
    else:
        for value in sorted(distinct, key=lambda v: (0, v, "") if numeric else (1, 0, repr(v))):
            groups.append((value, value, value, [r for v, r in pairs if v == value]))
    out = []
    for value, low, high, members in groups:
        entry: dict[str, Any] = {"value": value, "low": low, "high": high, "n": len(members)}
        for name in metrics:
            xs = np.array([m for m in (metric(r, name) for r in members) if m is not None])
            q = np.quantile(xs, [0, 0.25, 0.5, 0.75, 1]) if xs.size else [math.nan] * 5
            entry.update(
                {
                    f"{name}_median": float(q[2]),
                    f"{name}_q1": float(q[1]),
                    f"{name}_q3": float(q[3]),
                    f"{name}_min": float(q[0]),
                    f"{name}_max": float(q[4]),
                }
            )
        out.append(entry)
    return out
