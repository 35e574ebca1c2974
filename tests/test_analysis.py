"""The analysis layer (bdlab.analysis) against values computed by hand: success rate, DER, collapse,
bootstrap intervals, the logistic ACC-ASR fit, the defender's and the oracle's choices and their
regret, hyperparameter importance and sensitivity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bdlab import analysis as A

ROOT = Path(__file__).resolve().parents[1]


def row(trial=0, *, acc, asr, before_acc=0.90, before_asr=1.0, status="complete", cell="c", **extra):
    """One trial row, as bdlab.report.trial_rows writes it (the columns the analysis reads)."""
    params = extra.pop("params", {})
    return {
        "cell": cell,
        "trial": trial,
        "status": status,
        "default_config": False,
        "params": json.dumps(params),
        "acc": acc,
        "asr": asr,
        "before_acc": before_acc,
        "before_asr": before_asr,
        **extra,
    }


# --- success rate, collapse, DER -------------------------------------------------------------------

# before_acc 0.90 everywhere; 10 classes, so collapsed means acc <= 0.1 + 0.05 = 0.15
FIVE = [
    row(0, acc=0.89, asr=0.03),  # drop 0.01, asr 0.03: success
    row(1, acc=0.87, asr=0.01),  # drop 0.03 > 0.02: fails on ACC
    row(2, acc=0.90, asr=0.20),  # drop 0.00, asr 0.20 > 0.05: fails on ASR
    row(3, acc=0.12, asr=0.00),  # collapsed (0.12 <= 0.15), drop 0.78
    row(4, acc=0.88, asr=0.05, before_acc=0.89),  # drop 0.01, asr exactly at the bound: success
    row(5, acc=None, asr=None, status="failed"),  # not complete: in neither count
]


def test_success_rate_on_hand_rows():
    # defaults (ASR <= 0.05, drop <= 0.02): rows 0 and 4 of 5 complete -> 2/5
    assert A.success_rate(FIVE, num_classes=10) == pytest.approx(2 / 5)
    # ASR bound 0.25: row 2 joins (drop 0) -> 3/5
    assert A.success_rate(FIVE, num_classes=10, max_asr=0.25) == pytest.approx(3 / 5)
    # drop bound 0.05: row 1 joins (drop 0.03, asr 0.01) -> 3/5
    assert A.success_rate(FIVE, num_classes=10, max_acc_drop=0.05) == pytest.approx(3 / 5)
    # a stricter ASR bound 0.04: row 4 (0.05) leaves -> 1/5
    assert A.success_rate(FIVE, num_classes=10, max_asr=0.04) == pytest.approx(1 / 5)
    assert math.isnan(A.success_rate(FIVE[5:], num_classes=10))  # nothing complete


def test_collapsed_trials_never_count_as_successes_unless_asked():
    # ASR alone (no ACC bound): rows 0, 1, 4 pass; row 3 has ASR 0 but is collapsed; row 2 fails
    assert A.success_rate(FIVE, num_classes=10, max_acc_drop=None) == pytest.approx(3 / 5)
    # counting the collapsed one -> 4/5; so does switching the check off
    assert A.success_rate(FIVE, num_classes=10, max_acc_drop=None, include_collapsed=True) == pytest.approx(
        4 / 5
    )
    assert A.success_rate(FIVE, num_classes=None, max_acc_drop=None) == pytest.approx(4 / 5)


def test_collapsed_is_near_chance():
    # 10 classes, margin 0.05: acc <= 0.15 (0.1 + 0.05 is 0.15000000000000002 in floats)
    assert A.collapsed([0.10, 0.15, 0.151, 0.90], 10).tolist() == [True, True, False, False]
    assert A.collapsed(0.12, 10) is True
    assert A.collapsed(0.12, 10, margin=0.01) is False  # 0.12 > 0.11
    # 100 classes: acc <= 0.01 + 0.05 = 0.06
    assert A.collapsed([0.06, 0.07], 100).tolist() == [True, False]
    with pytest.raises(ValueError):
        A.collapsed(0.5, 1)


def test_der_on_hand_rows():
    # (0.9 - 0.1 ASR removed, 0.9 - 0.85 = 0.05 ACC lost): (0.9 - 0.05 + 1) / 2 = 0.925
    assert A.row_der(row(acc=0.85, asr=0.10, before_acc=0.90, before_asr=1.0)) == pytest.approx(0.925)
    # ACC gained (0.80 -> 0.82) and ASR rose (0.3 -> 0.4): both count as 0 -> (0 - 0 + 1) / 2 = 0.5
    assert A.row_der(row(acc=0.82, asr=0.40, before_acc=0.80, before_asr=0.30)) == pytest.approx(0.5)
    # all accuracy lost (0.9 -> 0.1), no ASR removed (0.95 -> 0.95): (0 - 0.8 + 1) / 2 = 0.1
    assert A.row_der(row(acc=0.10, asr=0.95, before_acc=0.90, before_asr=0.95)) == pytest.approx(0.1)
    # ASR 1 -> 0 at no cost: (1 - 0 + 1) / 2 = 1
    assert A.defense_effectiveness_rating(0.9, 0.9, 1.0, 0.0) == pytest.approx(1.0)
    assert A.row_der(row(acc=0.5, asr=0.5, before_asr=None)) is None


def test_der_agrees_with_the_trials_metric():
    """The analysis recomputes `der` without torch; it must be the formula trials.metrics stores."""
    from trials.metrics import defense_effectiveness_rating

    for before_acc, acc, before_asr, asr in [
        (0.9, 0.85, 1.0, 0.1),
        (0.8, 0.82, 0.3, 0.4),
        (0.9, 0.1, 0.95, 0.2),
    ]:
        stored = defense_effectiveness_rating(
            {"acc": before_acc, "asr": before_asr}, {"acc": acc, "asr": asr}
        )
        assert A.defense_effectiveness_rating(before_acc, acc, before_asr, asr) == pytest.approx(stored)


# --- bootstrap -------------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_contains_the_estimate_and_narrows_with_data():
    data = np.random.default_rng(7).normal(0.5, 0.1, size=400)
    small, large = data[:20], data
    first = A.bootstrap_interval(small, seed=3)
    assert A.bootstrap_interval(small, seed=3) == first  # same seed: the same interval, exactly
    # the seed is used: the mean of 20 continuous values differs between resample sets (the median's
    # quantiles often fall on the same order statistic whatever the seed)
    assert A.bootstrap_interval(small, np.mean, seed=4) != A.bootstrap_interval(small, np.mean, seed=3)
    estimate, low, high = first
    assert estimate == pytest.approx(float(np.median(small)))
    assert low <= estimate <= high
    wide = high - low
    _, low_l, high_l = A.bootstrap_interval(large, seed=3)
    # the median's standard error shrinks as 1/sqrt(n): 20 -> 400 values is a factor sqrt(20) ~ 4.5
    assert high_l - low_l < wide / 2


def test_bootstrap_exact_cases():
    # constant data: every resample has the same median -> a zero-width interval
    assert A.bootstrap_interval([0.3] * 12) == (0.3, 0.3, 0.3)
    assert A.bootstrap_interval([0.7]) == (0.7, 0.7, 0.7)
    # values {0, 1}, the mean: a resample's mean is 0 (prob 1/4), 0.5 (1/2) or 1 (1/4); the 2.5 % and
    # 97.5 % quantiles of 10,000 of them are 0 and 1 (each end holds ~25 %, far above 2.5 %)
    assert A.bootstrap_interval([0.0, 1.0], np.mean) == (0.5, 0.0, 1.0)
    # level 0.6: the 20 % and 80 % quantiles fall in the end masses (below 25 %, above 75 %) -> 0 and 1
    assert A.bootstrap_interval([0.0, 1.0], np.mean, level=0.6) == (0.5, 0.0, 1.0)
    # level 0.4: the 30 % and 70 % quantiles both fall in the middle mass (25 % .. 75 %) -> 0.5
    assert A.bootstrap_interval([0.0, 1.0], np.mean, level=0.4) == (0.5, 0.5, 0.5)


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # 400 values of standard deviation s: the mean's 95 % interval is about mean +- 1.96 s / sqrt(400)
    data = np.random.default_rng(7).normal(0.5, 0.1, size=400)
    estimate, low, high = A.bootstrap_interval(data, np.mean)
    half = 1.96 * data.std() / 20
    assert estimate == pytest.approx(data.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(estimate, abs=0.1 * half)


def test_bootstrap_takes_statistics_without_axis():
    data = np.random.default_rng(1).uniform(size=15)
    by_axis = A.bootstrap_interval(data, np.max, resamples=500)
    one_by_one = A.bootstrap_interval(data, lambda v: float(np.max(v)), resamples=500)
    assert by_axis == one_by_one  # the same draws, the statistic applied per resample
    assert by_axis.high == pytest.approx(float(data.max()))  # a worst case's bootstrap stops at the max
    with pytest.raises(ValueError):
        A.bootstrap_interval([])
    with pytest.raises(ValueError):
        A.bootstrap_interval([0.1, float("nan")])


def test_robustness_summary_per_group():
    rows = [
        # group (badnets, ft): three seeds; ACC drops 0.01, 0.04, 0.02 (before 0.90)
        row(0, acc=0.89, asr=0.10, attack="badnets", defense="ft"),
        row(1, acc=0.86, asr=0.30, attack="badnets", defense="ft"),
        row(2, acc=0.88, asr=0.02, attack="badnets", defense="ft"),
        # group (badnets, dhbe): one complete seed, one failed
        row(3, acc=0.90, asr=0.00, attack="badnets", defense="dhbe"),
        row(4, acc=None, asr=None, attack="badnets", defense="dhbe", status="failed"),
    ]
    ft, dhbe = A.robustness_summary(rows, num_classes=10, resamples=2000)
    assert ft["group"] == ("badnets", "ft") and ft["n"] == 3 and ft["collapsed"] == 0
    assert ft["asr_median"].estimate == pytest.approx(0.10)  # median of 0.10, 0.30, 0.02
    assert ft["asr_worst"].estimate == pytest.approx(0.30)  # worst case: the largest ASR
    assert ft["acc_drop_median"].estimate == pytest.approx(0.02)  # median of 0.01, 0.04, 0.02
    assert ft["acc_drop_worst"].estimate == pytest.approx(0.04)
    assert ft["asr_worst"] == A.bootstrap_interval([0.10, 0.30, 0.02], np.max, resamples=2000)
    # DER per seed: (0.9 - 0.01 + 1)/2 = 0.945, (0.7 - 0.04 + 1)/2 = 0.83, (0.98 - 0.02 + 1)/2 = 0.98
    assert ft["der_median"].estimate == pytest.approx(0.945)
    # only seed 2 has ASR <= 0.05 and drop <= 0.02 -> 1/3
    assert ft["success_rate"] == pytest.approx(1 / 3)
    assert dhbe["n"] == 1 and dhbe["asr_median"] == (0.0, 0.0, 0.0) and dhbe["success_rate"] == 1.0


# --- the logistic ACC-ASR curve --------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, steepness, midpoint, floor",
    [(0.60, 15.0, 0.35, 0.25), (0.50, -8.0, 0.60, 0.40)],  # ACC rising with ASR, and falling
)
def test_logistic_fit_recovers_known_parameters(height, steepness, midpoint, floor):
    rng = np.random.default_rng(0)
    asr = rng.uniform(0, 1, size=60)
    truth = height / (1 + np.exp(-steepness * (asr - midpoint))) + floor
    acc = truth + rng.normal(0, 0.003, size=asr.size)
    fit = A.fit_logistic(acc, asr)
    assert not fit.flat
    assert fit.height == pytest.approx(height, abs=0.02)
    assert fit.steepness == pytest.approx(steepness, rel=0.1)
    assert fit.midpoint == pytest.approx(midpoint, abs=0.02)
    assert fit.floor == pytest.approx(floor, abs=0.02)
    assert fit.rmse < 0.005  # the noise's standard deviation is 0.003
    # the callable is the formula: at the midpoint, floor + height / 2
    assert fit(fit.midpoint) == pytest.approx(fit.floor + fit.height / 2)
    assert np.allclose(
        fit([0.0, 1.0]),
        fit.height / (1 + np.exp(-fit.steepness * (np.array([0.0, 1.0]) - fit.midpoint))) + fit.floor,
    )


def test_logistic_fit_degenerate_inputs():
    flat = A.fit_logistic([0.8] * 5, [0.1, 0.2, 0.3, 0.4, 0.5])  # every ACC equal: a flat line
    assert flat.flat and flat.height == 0.0 and flat.floor == 0.8 and flat.midpoint == 0.3
    assert np.allclose(flat([0.0, 0.5, 1.0]), 0.8)
    with pytest.raises(ValueError, match="same ASR"):
        A.fit_logistic([0.5, 0.6, 0.7, 0.8], [0.2] * 4)
    with pytest.raises(ValueError, match="4 parameters"):
        A.fit_logistic([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        A.fit_logistic([0.5, 0.6, 0.7, float("nan")], [0.1, 0.2, 0.3, 0.4])


# --- the defender's choice, the oracle's, and the regret -------------------------------------------

# one cell, backdoored model ACC 0.90, ASR 1.0; 10 classes (collapsed: ACC <= 0.15)
CELL = [
    # drop 0.007: the highest report ACC, and the lowest val_asr (unlike its report ASR, on purpose:
    # neither may decide a choice)
    row(0, acc=0.893, asr=0.60, val_acc=0.880, val_asr=0.01, default_config=True),
    row(1, acc=0.890, asr=0.90, val_acc=0.895, val_asr=0.95),  # drop 0.010: highest val_acc
    row(2, acc=0.882, asr=0.05, val_acc=0.870, val_asr=0.02),  # drop 0.018: lowest ASR in the bound
    row(3, acc=0.800, asr=0.01, val_acc=0.800, val_asr=0.00),  # drop 0.100: outside 0.02
    row(4, acc=0.100, asr=0.00, val_acc=0.100, val_asr=0.00),  # collapsed
    row(5, acc=None, asr=None, val_acc=0.990, status="failed"),  # not complete: never chosen
]


def test_defender_choice_uses_clean_validation_accuracy_only():
    # highest val_acc among complete trials: trial 1 (0.895); trial 5's 0.99 failed. A defender that
    # read val_asr would have taken trial 0, 3 or 4, one that read the report ACC trial 0.
    assert A.defender_choice(CELL)["trial"] == 1
    assert A.defender_choice(CELL, rule="default")["trial"] == 0
    # a tie in val_acc goes to the default configuration
    tie = [row(0, acc=0.8, asr=0.5, val_acc=0.9), row(1, acc=0.8, asr=0.5, val_acc=0.9, default_config=True)]
    assert A.defender_choice(tie)["trial"] == 1
    assert A.defender_choice(CELL[5:]) is None
    with pytest.raises(ValueError, match="cells"):
        A.defender_choice([*CELL, row(9, acc=0.9, asr=0.1, val_acc=0.9, cell="other")])


def test_oracle_choice_keeps_to_the_bound_and_skips_collapsed_models():
    # drop <= 0.02: trials 0 (0.60), 1 (0.90), 2 (0.05) -> trial 2 (on val_asr it would be trial 0)
    assert A.oracle_choice(CELL, num_classes=10)["trial"] == 2
    # drop <= 0.2 admits trial 3 (ASR 0.01)
    assert A.oracle_choice(CELL, num_classes=10, max_acc_drop=0.2)["trial"] == 3
    # no bound: trial 4 has the lowest ASR (0.00) but is collapsed -> trial 3; without the check, 4
    assert A.oracle_choice(CELL, num_classes=10, max_acc_drop=None)["trial"] == 3
    assert A.oracle_choice(CELL, num_classes=None, max_acc_drop=None)["trial"] == 4
    assert A.oracle_choice(CELL, num_classes=10, max_acc_drop=0.005) is None  # nothing within 0.5 points


def test_regret_where_the_defender_and_the_oracle_disagree():
    r = A.regret(CELL, num_classes=10)
    assert (r.defender["trial"], r.oracle["trial"]) == (1, 2)
    assert r.asr == pytest.approx(0.90 - 0.05)  # 0.85 of ASR left in by choosing without the trigger
    assert r.acc_drop == pytest.approx(0.010 - 0.018)  # -0.008: the defender kept more accuracy
    d = A.regret(CELL, num_classes=10, rule="default")
    assert d.asr == pytest.approx(0.60 - 0.05)  # 0.55
    assert d.acc_drop == pytest.approx(0.007 - 0.018)  # -0.011
    # when the defender's pick is the oracle's, the regret is zero
    agree = [CELL[2], CELL[3]]  # trial 2 has the higher val_acc (0.870) and is the oracle's choice
    zero = A.regret(agree, num_classes=10)
    assert (zero.asr, zero.acc_drop) == (0.0, 0.0)
    assert A.regret(CELL, num_classes=10, max_acc_drop=0.005) is None  # no oracle choice


# --- hyperparameters -------------------------------------------------------------------------------


def random_rows(n, value, seed=0):
    """n trials with parameters a, b uniform on [0, 1] (independent), a constant c, and acc = value(a, b)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = float(rng.uniform()), float(rng.uniform())
        out.append(row(i, acc=value(a, b), asr=1 - value(a, b), params={"a": a, "b": b, "c": "x"}))
    return out


@pytest.mark.parametrize("evaluator", ["ped_anova", "fanova"])
def test_importance_ranks_the_deciding_parameter_above_noise(evaluator):
    rows = random_rows(60, lambda a, b: a)  # acc is a; b is pure noise; c never varies
    found = A.hyperparameter_importance(rows, ["a", "b", "c"], "acc", evaluator=evaluator)
    assert list(found) == ["a", "b", "c"]
    assert found["a"] > 0.8 and found["b"] < 0.2 and found["c"] == 0.0
    assert sum(found.values()) == pytest.approx(1.0)
    # the same with ASR (= 1 - a), minimized
    assert list(A.hyperparameter_importance(rows, ["a", "b"], "asr", evaluator=evaluator))[0] == "a"


def test_ped_anova_looks_at_the_best_trials_of_the_right_direction():
    # the best values (acc > 1.8) are decided by a (a > 0.8), the worst by b (acc = -b where a <= 0.8):
    # maximizing, a matters; read as a quantity to minimize, b does. PED-ANOVA only sees the top
    # 10 %, so the negation of a target to maximize must be right for the ranking to be.
    rows = random_rows(100, lambda a, b: 1 + a if a > 0.8 else -b)
    assert list(A.hyperparameter_importance(rows, ["a", "b"], "acc")) == ["a", "b"]
    assert list(A.hyperparameter_importance(rows, ["a", "b"], "acc", direction="minimize")) == ["b", "a"]
    with pytest.raises(ValueError, match="maximized or minimized"):
        A.hyperparameter_importance(rows, ["a", "b"], "seconds")
    with pytest.raises(ValueError, match="cells"):
        A.hyperparameter_importance([*rows, {**rows[0], "cell": "other"}], ["a", "b"], "acc")


def test_inferred_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    rows = [
        row(0, acc=0.5, asr=0.5, params={"lr": 1e-4, "epochs": 5, "opt": "sgd", "w": 0.1, "k": 3}),
        row(1, acc=0.5, asr=0.5, params={"lr": 1e-1, "epochs": 20, "opt": "adam", "w": 0.5, "k": 3}),
    ]
    d = A.infer_distributions(rows, ["lr", "epochs", "opt", "w", "k"])
    assert d["lr"] == FloatDistribution(1e-4, 1e-1, log=True)  # 3 decades: log scale
    assert d["w"] == FloatDistribution(0.1, 0.5)  # a factor 5: linear
    assert d["epochs"] == IntDistribution(5, 20)
    assert d["opt"] == CategoricalDistribution(["adam", "sgd"])
    assert "k" not in d  # constant


def test_sensitivity_per_value_and_per_bin():
    lr = [0.01, 0.01, 0.01, 0.1, 0.1]
    accs = [0.9, 0.8, 0.7, 0.2, 0.4]
    asrs = [0.5, 0.9, 0.1, 0.0, 0.0]
    rows = [row(i, acc=accs[i], asr=asrs[i], params={"lr": lr[i]}) for i in range(5)]
    rows.append(row(5, acc=0.5, asr=0.5, params={}))  # ran without lr: not counted
    low, high = A.sensitivity(rows, "lr")
    assert (low["value"], low["n"], high["value"], high["n"]) == (0.01, 3, 0.1, 2)
    # lr 0.01: acc 0.7, 0.8, 0.9 -> median 0.8, quartiles 0.75 / 0.85 (linear interpolation)
    assert (low["acc_median"], low["acc_q1"], low["acc_q3"]) == pytest.approx((0.8, 0.75, 0.85))
    assert (low["acc_min"], low["acc_max"]) == pytest.approx((0.7, 0.9))
    # asr 0.1, 0.5, 0.9 -> median 0.5, quartiles 0.3 / 0.7
    assert (low["asr_median"], low["asr_q1"], low["asr_q3"]) == pytest.approx((0.5, 0.3, 0.7))
    # lr 0.1: acc 0.2, 0.4 -> median 0.3, quartiles 0.25 / 0.35
    assert (high["acc_median"], high["acc_q1"], high["acc_q3"]) == pytest.approx((0.3, 0.25, 0.35))
    # ten distinct values (1..10) with at most 8 levels: 2 bins at the quantiles [1, 5.5, 10]
    binned = [row(i, acc=v / 10, asr=0.0, params={"x": v}) for i, v in enumerate(range(1, 11))]
    first, second = A.sensitivity(binned, "x", bins=2)
    assert (first["low"], first["high"], first["n"]) == (1.0, 5.5, 5)  # 1..5
    assert (second["low"], second["high"], second["n"]) == (5.5, 10.0, 5)  # 6..10, the top edge included
    assert first["acc_median"] == pytest.approx(0.3) and second["acc_median"] == pytest.approx(0.8)


# --- the table, and no torch -----------------------------------------------------------------------


def test_rows_of_a_parquet_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bdlab.report import table_schema

    pq.write_table(
        pa.Table.from_pylist([dict(r) for r in FIVE], schema=table_schema()), tmp_path / "t.parquet"
    )
    rows = A.load_rows(tmp_path / "t.parquet")
    assert len(rows) == 6 and rows[5]["acc"] is None
    assert A.success_rate(rows, num_classes=10) == pytest.approx(2 / 5)


def test_the_analysis_does_not_import_torch():
    probe = "import sys, bdlab.analysis; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
