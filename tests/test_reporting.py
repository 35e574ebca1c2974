"""`bdlab report` (bdlab.reporting): the table builders against hand-computed mean ± std, and the
command on a real tiny study sweep (real Ray, MLflow's SQLite store, Optuna) writing the four files
and logging them to the sweep's parent run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bdlab import reporting as R

TESTS = Path(__file__).resolve().parent
A0 = "digits/mini_resnet/badnets(ratio=0.2)/s0"
A1 = "digits/mini_resnet/badnets(ratio=0.2)/s1"


def row(cell, trial, *, acc, asr, val_acc, val_asr, before_acc, before_asr, default=False, lr=0.01, **extra):
    return {
        "generation": 1,
        "cell": f"{cell} :: ft",
        "attack": "badnets",
        "defense": "ft",
        "dataset": "digits",
        "model": "mini_resnet",
        "cache_key": cell,
        "trial": trial,
        "status": "complete",
        "default_config": default,
        "params": json.dumps({"lr": lr}),
        "acc": acc,
        "asr": asr,
        "val_acc": val_acc,
        "val_asr": val_asr,
        "before_acc": before_acc,
        "before_asr": before_asr,
        **extra,
    }


# two attack seeds, one defense, two configurations each: s0's best val_acc is trial 1 (0.85),
# s1's is its default (0.80 > 0.79)
ROWS = [
    row(A0, 0, acc=0.80, asr=0.10, val_acc=0.82, val_asr=0.12, before_acc=0.90, before_asr=1.0, default=True),
    row(A0, 1, acc=0.70, asr=0.02, val_acc=0.85, val_asr=0.03, before_acc=0.90, before_asr=1.0, lr=0.05),
    row(
        A1, 0, acc=0.84, asr=0.06, val_acc=0.80, val_asr=0.05, before_acc=0.94, before_asr=0.98, default=True
    ),
    row(A1, 1, acc=0.74, asr=0.04, val_acc=0.79, val_asr=0.02, before_acc=0.94, before_asr=0.98, lr=0.05),
]


def test_mean_std_formats_percent_with_sample_std_and_single_values():
    assert R.mean_std([0.80, 0.84]) == "82.00 ± 2.83"  # sd = 0.04 / sqrt(2)
    assert R.mean_std([0.5]) == "50.00 (n=1)"
    assert R.mean_std([None, float("nan")]) == "-"


def test_default_and_tuned_tables_pool_attack_seeds():
    default = R.acc_asr_tables(ROWS, R.default_rows(ROWS), "default")
    assert len(default) == 1 and default[0].title == "digits/mini_resnet: default"
    assert default[0].header == ["attack", "no defense ACC", "no defense ASR", "ft ACC", "ft ASR"]
    # no defense: (0.90, 0.94) and (1.0, 0.98); ft defaults: (0.80, 0.84) and (0.10, 0.06)
    assert default[0].rows == [
        ["badnets(ratio=0.2)", "92.00 ± 2.83", "99.00 ± 1.41", "82.00 ± 2.83", "8.00 ± 2.83"]
    ]

    # default objectives: lowest val_asr within 2 points of the cell's best val_acc. s0: best 0.85,
    # the default (0.82) is out -> trial 1; s1: best 0.80, trial 1 (0.79) is in and has val_asr 0.02
    tuned = R.tuned_rows(ROWS, {"acc": "max", "asr": "min"})
    assert sorted((r["cell"], r["trial"]) for r in tuned) == [(f"{A0} :: ft", 1), (f"{A1} :: ft", 1)]
    table = R.acc_asr_tables(ROWS, tuned, "tuned")[0]
    assert table.rows[0][3:] == ["72.00 ± 2.83", "3.00 ± 1.41"]  # (0.70, 0.74) and (0.02, 0.04)
    # with s1's trial 1 three points below its default, the tolerance keeps the default
    lower = [dict(r, val_acc=0.77) if (r["cache_key"], r["trial"]) == (A1, 1) else r for r in ROWS]
    assert sorted(r["trial"] for r in R.tuned_rows(lower, {"acc": "max", "asr": "min"})) == [0, 1]

    # the spec's objectives decide: on val_asr alone, trial 1 of both cells
    by_asr = R.tuned_rows(ROWS, {"asr": "min"})
    assert {r["trial"] for r in by_asr} == {1}
    assert R.acc_asr_tables(ROWS, by_asr, "t")[0].rows[0][3:] == ["72.00 ± 2.83", "3.00 ± 1.41"]


def test_tuned_pools_a_study_configuration_over_its_seeds_and_never_reads_the_report_half():
    base = {"before_acc": 0.9, "before_asr": 1.0, "design": "sobol"}
    rows = [
        # configuration 0 (default): mean val_acc 0.80; configuration 1: mean 0.81, though its
        # report ACC is far worse
        row(A0, 0, acc=0.88, asr=0.5, val_acc=0.78, val_asr=0.5, default=True, configuration=0, **base),
        row(A0, 1, acc=0.88, asr=0.5, val_acc=0.82, val_asr=0.5, default=True, configuration=0, **base),
        row(A0, 2, acc=0.20, asr=0.0, val_acc=0.81, val_asr=0.5, lr=0.1, configuration=1, **base),
        row(A0, 3, acc=0.30, asr=0.0, val_acc=0.81, val_asr=0.5, lr=0.1, configuration=1, **base),
    ]
    assert [r["trial"] for r in R.tuned_rows(rows, {"acc": "max"})] == [2, 3]
    assert R.acc_asr_tables(rows, R.tuned_rows(rows, {"acc": "max"}), "t")[0].rows[0][3] == "25.00 ± 7.07"


def test_amplified_table_keeps_measured_layouts_and_is_omitted_without_any():
    rows = [dict(r, asr_x4=0.5 if r["trial"] == 0 else None) for r in ROWS]
    table = R.amplified_tables(rows, R.default_rows(rows), "default")[0]
    assert table.header == ["attack", "ft x4"] and table.rows == [["badnets(ratio=0.2)", "50.00 ± 0.00"]]
    report = R.build_report(ROWS, "s")
    assert not any("amplified" in t.title for t in report.tables)
    assert any("amplified-trigger table omitted" in n for n in report.notes)


def test_latex_is_booktabs_and_escaped():
    tex = R.to_latex(R.build_report(ROWS, "my_sweep"))
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"82.00 $\pm$ 2.83" in tex
    assert r"\begin{tabular}{lrrrr}" in tex  # attack + 4 numeric columns


def test_pareto_rows_on_the_validation_objectives():
    front = R.pareto_rows([r for r in ROWS if r["cell"].startswith(A0)], {"acc": "max", "asr": "min"})
    assert [r["trial"] for r in front] == [1]  # trial 1: higher val_acc and lower val_asr


def test_study_section_regret_success_and_the_default_filled_in():
    base = {"before_acc": 0.90, "before_asr": 1.0, "design": "sobol", "val_asr": 0.5}
    rows = [
        # the default configuration records no lr (FT's declared default: 0.01)
        row(A0, 0, acc=0.89, asr=0.30, val_acc=0.90, default=True, configuration=0, **base),
        row(A0, 1, acc=0.88, asr=0.20, val_acc=0.89, default=True, configuration=0, **base),
        row(A0, 2, acc=0.885, asr=0.02, val_acc=0.86, lr=0.05, configuration=1, **base),
        row(A0, 3, acc=0.80, asr=0.00, val_acc=0.80, lr=0.05, configuration=1, **base),
    ]
    for r in rows[:2]:
        r["params"] = "{}"
    assert [json.loads(r["params"]) for r in R.with_full_params(rows)][:3] == [
        {"lr": 0.01},
        {"lr": 0.01},
        {"lr": 0.05},
    ]
    section = R.study_section(rows, {"acc": "max", "asr": "min"}, num_classes=10, resamples=200)
    robustness, choice, importance = section.tables
    assert robustness.rows[0][:3] == ["4", "0", "25.0"]  # only trial 2: ASR <= 5 %, drop 1.5 <= 2
    # defender: trial 0 (val_acc 0.90); oracle: trial 2 (trial 3 lowers ASR but drops 10 points)
    assert [line[1] for line in choice.rows] == ["0", "2"]
    assert choice.note == "regret: ASR +28.00 points, ACC drop -0.50 points"
    assert importance.header == ["target", "lr"]
    assert [title for title, _ in section.figures] == ["ACC vs ASR (report half)", "sensitivity to lr"]


# --- the command on a real study sweep ------------------------------------------------------------


@pytest.mark.sweep
def test_report_command_writes_four_files_and_logs_them_to_the_parent_run(study_sweep, tmp_path, capsys):
    from bdlab.cli import main
    from bdlab.tracking import Store

    out = tmp_path / "report"
    assert main(["report", "tiny-report", "--results", str(study_sweep), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(R.REPORT_FILES)

    md = (out / "tables.md").read_text()
    for heading in (
        "digits(test_subset=200,train_subset=400)/mini_resnet: default configuration",
        "tuned configuration (chosen on the validation half)",
        "## Study cell",
        "robustness (report half",
        "defender's choice vs the oracle's",
        "regret: ",
        "hyperparameter importance",
        "collapsed trials",
        "validation Pareto front",
    ):
        assert heading in md, heading
    assert "amplified trigger" in md  # BadNets is a patch: asr_x4/x5/x9 are measured
    # one study cell: the defaults are 4 trials (2 seeds x 2 subsets), pooled as mean ± std
    default_line = next(line for line in md.splitlines() if line.startswith("| badnets(ratio=0.2) |"))
    assert default_line.count("±") == 2  # ft (budget 0.02) ACC and ASR
    assert default_line.count("(n=1)") == 2  # no defense ACC and ASR: the one backdoored model

    page = (out / "report.html").read_text()
    srcs = re.findall(r"src=['\"]([^'\"]*)", page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)  # scatter, lr
    assert "href=" not in page and "<link" not in page
    assert "success rate" in page and "<table>" in page

    tex = (out / "tables.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\bottomrule") >= 4
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == 1 + 8 and lines[0].startswith("sweep,generation,study,trial,default_config")

    tracker = Store.open(study_sweep).tracker()
    parent = R.parent_run_id(tracker, "tiny-report")
    logged = tracker.list_artifacts(parent, "report")
    assert sorted(logged) == sorted(f"report/{n}" for n in R.REPORT_FILES)


@pytest.mark.sweep
def test_unknown_sweep_is_one_line_listing_the_sweeps(study_sweep, tmp_path, capsys):
    from bdlab.cli import main

    assert main(["report", "nope", "--results", str(study_sweep), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bdlab: error: sweep: 'nope'")
    assert "tiny-report" in err
    assert not (tmp_path / "r").exists()


# --- the end-of-sweep summary follows the spec's objectives -----------------------------------------


def _summary(objectives):
    point = lambda n, acc, asr, der: {"trial": n, "report": {"acc": acc, "asr": asr, "der": der}}  # noqa: E731
    return {
        "objectives": objectives,
        "cells": [
            {
                "cell": "digits/mini_resnet/badnets/s0 :: ft",
                "before": {"acc": 0.97, "asr": 1.0},  # a backdoored model has no DER
                "default": point(0, 0.95, 0.40, 0.79),
                "front": [point(2, 0.93, 0.0, 0.98)],
                "points": [point(0, 0.95, 0.40, 0.79), point(1, 0.5, 0.0, 0.765), point(2, 0.93, 0.0, 0.98)],
                "complete": 3,
                "failed": 0,
            }
        ],
    }


def test_summary_table_shows_the_objectives_metrics():
    from bdlab.report import summary_table

    default = summary_table(_summary({"acc": "max", "asr": "min"})).splitlines()
    assert "before ACC/ASR" in default[0] and "report ACC/ASR" in default[0]
    assert "| 0.970/1.000 | 0.950/0.400 | 3/0 | 1: #2: 0.930/0.000 |" in default[2]
    assert default[-2].startswith("acc (max): #{f(x) = y} / N") and default[-1].startswith("asr (min)")

    assert not any(line.startswith("collapsed") for line in default)

    der = summary_table(_summary({"der": "max", "acc": "max"})).splitlines()
    assert "before DER/ACC" in der[0] and "report DER/ACC" in der[0]
    assert "| n/a/0.970 | 0.790/0.950 | 3/0 | 1: #2: 0.980/0.930 |" in der[2]
    assert der[-2].startswith("der (max): [max(0, asr_before - asr_after)")


def test_summary_table_says_when_a_defense_collapsed_the_model():
    """A collapsed trial (ACC at chance) is marked, not shown as an erasure; a cell whose every trial
    collapsed has no front: the method does not work there (DHBE on digits)."""
    from bdlab.report import summary_table

    summary = _summary({"acc": "max", "asr": "min"})
    cell = summary["cells"][0]
    cell["points"][1]["collapsed"] = True  # trial 1: ACC 0.5 is not chance; the flag is summarize's
    assert "#2: 0.930/0.000 |" in summary_table(summary).splitlines()[2]
    cell["front"] = [cell["points"][1]]
    lines = summary_table(summary).splitlines()
    assert "| 1: #1: 0.500/0.000 collapsed |" in lines[2]
    assert lines[4].startswith("collapsed: report ACC within 5 points of chance")
    for p in cell["points"] + [cell["default"]]:
        p["collapsed"] = True
    lines = summary_table(summary).splitlines()
    assert "| 0.950/0.400 collapsed | 3/0 | none: all 3 trials collapsed, the method does not work on this problem |" in lines[2]


def test_pareto_plot_axes_follow_the_objectives():
    from bdlab.figures import front_axes
    from bdlab.report import pareto_figure

    assert front_axes({"acc": "max", "asr": "min"}) == ("asr", "acc")
    assert front_axes({"der": "max", "acc": "max"}) == ("acc", "der")
    assert front_axes({"asr": "min"}) == ("acc", "asr")
    assert front_axes({"der": "max"}) == ("asr", "der")
    summary = _summary({"der": "max", "acc": "max"})
    fig = pareto_figure(summary["cells"][0], summary["objectives"])
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("ACC") and ax.get_ylabel().startswith("DER")
    trials = next(c for c in ax.collections if c.get_label() == "trials")
    assert sorted(map(tuple, trials.get_offsets().tolist())) == [(0.5, 0.765), (0.93, 0.98), (0.95, 0.79)]
    # the backdoored model has no DER: it is not drawn, rather than drawn at a made-up value
    assert "backdoored model" not in [c.get_label() for c in ax.collections]


def test_best_so_far_lines_are_the_trials_that_join_the_validation_front():
    from bdlab.sweep import FrontTracker

    lines = FrontTracker({"acc": "max", "asr": "min"}, ["A :: ft", "B :: ft"])
    assert lines.offer(0, 0, {"val_acc": 0.90, "val_asr": 0.50}) == (
        "A :: ft: trial 0 joins the validation front (acc 0.900, asr 0.500)"
    )
    assert lines.offer(0, 1, {"val_acc": 0.80, "val_asr": 0.60}) is None  # dominated by trial 0
    assert lines.offer(0, 2, {"val_acc": 0.80, "val_asr": 0.10}) is not None  # a trade-off: joins
    assert lines.offer(0, 3, {"val_acc": 0.80, "val_asr": 0.10}) is None  # a tie is no news
    assert lines.offer(1, 0, {"val_acc": 0.10, "val_asr": 0.90}) is not None  # cells are separate
    assert lines.offer(1, 1, {"val_acc": 0.95}) is None  # an objective missing: nothing to compare
    # a spec maximizing DER alone: one number decides
    der = FrontTracker({"der": "max"}, ["A :: ft"])
    assert der.offer(0, 0, {"val_der": 0.7, "val_acc": 0.2}) is not None
    assert der.offer(0, 1, {"val_der": 0.6, "val_acc": 0.99}) is None
    assert der.offer(0, 2, {"val_der": 0.9}) == "A :: ft: trial 2 joins the validation front (der 0.900)"


def test_the_tuned_note_states_the_rule_that_chose():
    assert R.tuned_rule({"acc": "max", "asr": "min"}) == (
        "tuned: per cell, the lowest mean val_asr among the configurations whose mean val_acc is "
        "within 2 points of the cell's best; its report-half numbers are shown."
    )
    assert R.tuned_rule({"der": "max", "acc": "max"}) == (
        "tuned: per cell, the best mean validation val_der (max), then val_acc (max); its report-half "
        "numbers are shown."
    )
