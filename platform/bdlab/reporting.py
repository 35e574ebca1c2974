"""`bdlab report`: a sweep's paper-style tables and, for study cells, the robustness analysis.

From the sweep's trial rows (`bdlab.report.trial_rows`) it writes `report.html` (self-contained:
tables and figures inline), `tables.md`, `tables.tex` (booktabs) and `trials.csv`, and logs the four
under `report/` on the sweep's parent run. docs/report.md describes every section.

The tables pool, per attack (attack seeds pooled) and defense, every row of the chosen
configuration: attack seeds, defense seeds and held-out subsets alike, as mean +- sample std. The
tuned configuration of a cell is chosen on the validation half alone (`tuned_rows`); every figure
shown is the report half.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bdlab import analysis
from bdlab.analysis import Row
from bdlab.figures import Mark, front_figure
from bdlab.spec.reader import DEFAULT_OBJECTIVES

REPORT_FILES = ("report.html", "tables.md", "tables.tex", "trials.csv")
ARTIFACT_PATH = "report"
AMPLIFIED = ("asr_x4", "asr_x5", "asr_x9")
# classes of the registered datasets, for the collapse check; another dataset needs --num-classes
KNOWN_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "gtsrb": 43}


# --- tables ---------------------------------------------------------------------------------------


@dataclass
class Table:
    """A table in the three output formats' common form: cells are already formatted text."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def mean_std(values: Iterable[float | None], scale: float = 100.0, digits: int = 2) -> str:
    """`mean ± std` (sample std, ddof 1) of the finite values, times `scale` (fractions as percent);
    `x (n=1)` for one value, `-` for none."""
    xs = [float(v) for v in values if analysis._number(v) is not None]
    if not xs:
        return "-"
    mean = scale * float(np.mean(xs))
    if len(xs) == 1:
        return f"{mean:.{digits}f} (n=1)"
    std = scale * float(np.std(xs, ddof=1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def attack_label(row: Row) -> str:
    """The row's attack with its parameters, attack seed left out (seeds are pooled in a table)."""
    attacked = str(row.get("cell") or "").split(" :: ")[0]
    parts = attacked.split("/")
    if len(parts) >= 4 and parts[-1].startswith("s"):
        return parts[-2]
    return str(row.get("attack"))


def setting_label(row: Row) -> str:
    """Dataset and model: one table per setting."""
    attacked = str(row.get("cell") or "").split(" :: ")[0]
    parts = attacked.split("/")
    return "/".join(parts[:-2]) if len(parts) >= 4 else f"{row.get('dataset')}/{row.get('model')}"


def defense_label(row: Row) -> str:
    """The defense column: its name, and its clean-data budget where a study set one."""
    name = str(row.get("cell") or "").split(" :: ")[-1] or str(row.get("defense"))
    fraction = analysis._number(row.get("data_fraction"))
    return name if fraction is None else f"{name} (budget {fraction:g})"


def configuration_key(row: Row) -> tuple:
    """What identifies a configuration within a cell: a study's configuration index (and budget),
    else the parameters the trial ran with (a search trial is its own configuration)."""
    if row.get("configuration") is not None:
        return ("study", row.get("configuration"), row.get("data_fraction"))
    return ("params", row.get("params"))


def newest_generation(rows: Sequence[Row]) -> list[Row]:
    if not rows:
        return []
    newest = max(int(r.get("generation") or 1) for r in rows)
    return [r for r in rows if int(r.get("generation") or 1) == newest]


def default_rows(rows: Iterable[Row]) -> list[Row]:
    """The complete rows of every cell's default configuration."""
    return [r for r in analysis.complete_rows(rows) if r.get("default_config")]


def _score(members: Sequence[Row], objectives: Mapping[str, str]) -> tuple | None:
    out = []
    for name, direction in objectives.items():
        values = [analysis.metric(r, f"val_{name}") for r in members]
        values = [v for v in values if v is not None]
        if not values:
            return None
        mean = float(np.mean(values))
        out.append(-mean if direction == "max" else mean)
    return tuple(out)


# The tuned configuration under the default objectives: the lowest validation ASR among the
# configurations whose validation ACC is within this of the cell's best (the success threshold of
# docs/analysis.md). A lexicographic pick (ACC first) would keep the gentlest configuration, the
# one that does least, which is not what a paper's "tuned" column means.
TUNED_ACC_TOLERANCE = 0.02


def tuned_rows(rows: Iterable[Row], objectives: Mapping[str, str]) -> list[Row]:
    """Per cell, the complete rows of the configuration tuned on the validation half; each
    configuration is scored by its mean `val_<objective>` over its seeds and subsets.

    With the default objectives (ACC max, ASR min): the lowest mean `val_asr` among configurations
    whose mean `val_acc` is within TUNED_ACC_TOLERANCE of the cell's best. With other objectives:
    the lexicographic point of the front (the first objective, ties broken by the next ones). Then
    the default configuration, then the lowest trial. No report-half number is looked at."""
    constrained = dict(objectives) == DEFAULT_OBJECTIVES
    out: list[Row] = []
    for members in analysis.group_rows(analysis.complete_rows(rows), "cell").values():
        scored = []
        for config in analysis.group_rows(members, configuration_key).values():
            score = _score(config, objectives)
            if score is not None:
                tie = (not config[0].get("default_config"), min(int(r.get("trial", 0)) for r in config))
                scored.append((score, tie, config))
        if not scored:
            continue
        if constrained:  # score = (-mean val_acc, mean val_asr)
            best_acc = -min(s[0][0] for s in scored)
            eligible = [s for s in scored if -s[0][0] >= best_acc - TUNED_ACC_TOLERANCE - 1e-12]
            chosen = min(eligible, key=lambda s: (s[0][1], s[0][0], s[1]))
        else:
            chosen = min(scored, key=lambda s: (s[0], s[1]))
        out.extend(chosen[2])
    return out


def tuned_rule(objectives: Mapping[str, str]) -> str:
    """The sentence that says how `tuned_rows` chose, for the report's notes."""
    if dict(objectives) == DEFAULT_OBJECTIVES:
        rule = (
            "the lowest mean val_asr among the configurations whose mean val_acc is within "
            f"{100 * TUNED_ACC_TOLERANCE:g} points of the cell's best"
        )
    else:
        rule = "the best mean validation " + ", then ".join(f"val_{k} ({v})" for k, v in objectives.items())
    return f"tuned: per cell, {rule}; its report-half numbers are shown."


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def acc_asr_tables(rows: Sequence[Row], chosen: Sequence[Row], what: str) -> list[Table]:
    """One table per dataset/model: rows attacks, columns `no defense` then each defense's ACC and
    ASR (report half, percent, mean ± std over every chosen row)."""
    tables = []
    for setting in _ordered(setting_label(r) for r in rows):
        mine = [r for r in chosen if setting_label(r) == setting]
        defenses = _ordered(defense_label(r) for r in rows if setting_label(r) == setting)
        attacks = _ordered(attack_label(r) for r in rows if setting_label(r) == setting)
        header = ["attack", "no defense ACC", "no defense ASR"]
        for d in defenses:
            header += [f"{d} ACC", f"{d} ASR"]
        body = []
        for a in attacks:
            models = {
                r.get("cache_key"): r
                for r in analysis.complete_rows(rows)
                if setting_label(r) == setting and attack_label(r) == a
            }  # one backdoored model per attack seed, however many trials defend it
            line = [a, mean_std(r["before_acc"] for r in models.values())]
            line.append(mean_std(r.get("before_asr") for r in models.values()))
            for d in defenses:
                cell = [r for r in mine if attack_label(r) == a and defense_label(r) == d]
                line += [mean_std(r["acc"] for r in cell), mean_std(r["asr"] for r in cell)]
            body.append(line)
        tables.append(
            Table(
                f"{setting}: {what}",
                header,
                body,
                "ACC and ASR on the report half, in percent: mean ± sample std over attack seeds, "
                "defense seeds and held-out subsets; (n=1) marks a single run, - no complete run.",
            )
        )
    return tables


def amplified_tables(rows: Sequence[Row], chosen: Sequence[Row], what: str) -> list[Table]:
    """DHBE's Table 6: ASR with the patch stamped 4, 5 and 9 times, per attack and defense; the
    columns of layouts no row measured are left out (non-patch triggers have none)."""
    present = [m for m in AMPLIFIED if any(analysis.metric(r, m) is not None for r in chosen)]
    if not present:
        return []
    tables = []
    for setting in _ordered(setting_label(r) for r in chosen):
        mine = [r for r in chosen if setting_label(r) == setting]
        defenses = _ordered(defense_label(r) for r in mine)
        header = ["attack"] + [f"{d} {m.removeprefix('asr_')}" for d in defenses for m in present]
        body = []
        for a in _ordered(attack_label(r) for r in mine):
            line = [a]
            for d in defenses:
                cell = [r for r in mine if attack_label(r) == a and defense_label(r) == d]
                line += [mean_std(r.get(m) for r in cell) for m in present]
            body.append(line)
        tables.append(
            Table(
                f"{setting}: amplified trigger, {what}",
                header,
                body,
                "ASR (report half, percent) with the trigger stamped 4, 5 or 9 times (docs/metrics.md).",
            )
        )
    return tables


# --- the study analysis ---------------------------------------------------------------------------


@dataclass
class Section:
    """A study cell's analysis: its tables, figures (PNG bytes, titled) and remarks."""

    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _interval(iv: analysis.Interval | None, scale: float = 100.0) -> str:
    if iv is None:
        return "-"
    return f"{scale * iv.estimate:.2f} [{scale * iv.low:.2f}, {scale * iv.high:.2f}]"


def pareto_rows(rows: Sequence[Row], objectives: Mapping[str, str]) -> list[Row]:
    """The complete rows no other row beats on every validation objective (and strictly on one)."""
    scored = []
    for r in analysis.complete_rows(rows):
        s = _score([r], objectives)
        if s is not None:
            scored.append((s, r))
    return [r for s, r in scored if not any(dominates(t, s) for t, _ in scored)]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether score `a` beats `b` (both minimized, as `_score` writes them): no worse on every
    objective and better on one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _param_value(text: Any) -> Any:
    """A parameter as the run used it: MLflow stores every value as text ("0.01", "True")."""
    if not isinstance(text, str):
        return text
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _declared_defaults(defense: str) -> dict[str, Any]:
    try:
        from trials.defenses import make_defense
        from trials.params import as_dict

        return as_dict(make_defense(defense, {}).params)
    except Exception:  # an unregistered plugin defense: its defaults stay unknown
        return {}


def with_full_params(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The rows with typed parameters, a parameter some rows set and others not filled in with the
    defense's declared default (a run records only its overrides: the default configuration lacks
    the searched ones)."""
    decoded = [{k: _param_value(v) for k, v in analysis.params_of(r).items()} for r in rows]
    names = {k for p in decoded for k in p}
    defaults: dict[str, dict[str, Any]] = {}
    out = []
    for r, params in zip(rows, decoded, strict=True):
        missing = names - params.keys()
        if missing:
            declared = defaults.setdefault(str(r.get("defense")), _declared_defaults(str(r.get("defense"))))
            params.update({k: declared[k] for k in missing if k in declared})
        out.append({**r, "params": json.dumps(params, sort_keys=True)})
    return out


def varying_params(rows: Sequence[Row]) -> list[str]:
    """The parameters that take more than one value across the rows (the searched ones)."""
    seen: dict[str, set] = {}
    for r in rows:
        for k, v in analysis.params_of(r).items():
            seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    return sorted(k for k, v in seen.items() if len(v) > 1)


def study_section(
    rows: Sequence[Row], objectives: Mapping[str, str], num_classes: int | None, resamples: int = 10_000
) -> Section:
    """The analysis of one study cell (docs/analysis.md): robustness summary with bootstrap
    intervals, success rate, DER, defender vs oracle (regret), importance, sensitivity, the ACC-ASR
    scatter with its logistic fit and the validation Pareto front, collapsed trials."""
    done = with_full_params(analysis.complete_rows(rows))
    section = Section(str(rows[0].get("cell")))
    failed = len(rows) - len(done)
    section.notes.append(f"{len(done)} complete trials, {failed} failed or unfinished.")
    if not done:
        return section
    if num_classes is None:
        section.notes.append(
            "collapse check off: the dataset's number of classes is unknown (--num-classes)."
        )
    summary = analysis.robustness_summary(done, "cell", num_classes=num_classes, resamples=resamples)[0]
    section.tables.append(
        Table(
            "robustness (report half, percent; median and worst case with bootstrap 95 % intervals)",
            [
                "n",
                "collapsed",
                "success rate",
                "ASR median",
                "ASR worst",
                "ACC drop median",
                "ACC drop worst",
                "DER median",
            ],
            [
                [
                    str(summary["n"]),
                    "-" if summary["collapsed"] is None else str(summary["collapsed"]),
                    f"{100 * summary['success_rate']:.1f}",
                    _interval(summary["asr_median"]),
                    _interval(summary["asr_worst"]),
                    _interval(summary["acc_drop_median"]),
                    _interval(summary["acc_drop_worst"]),
                    _interval(summary["der_median"]),
                ]
            ],
            "success: ASR <= 5 % and ACC drop <= 2 points, collapsed trials never succeed.",
        )
    )
    reg = analysis.regret(done, num_classes=num_classes)
    mine = analysis.defender_choice(done)
    oracle = analysis.oracle_choice(done, num_classes=num_classes)
    choice_rows = []
    for who, r in (("defender (best val_acc)", mine), ("oracle (lowest report ASR, drop <= 2 pts)", oracle)):
        if r is None:
            choice_rows.append([who, "-", "-", "-", "-"])
        else:
            drop = analysis.acc_drop(r)
            choice_rows.append(
                [
                    who,
                    str(r.get("trial")),
                    r.get("params") or "{}",
                    f"{100 * r['asr']:.2f}",
                    f"{100 * drop:.2f}",
                ]
            )
    section.tables.append(
        Table(
            "defender's choice vs the oracle's",
            ["who", "trial", "params", "ASR", "ACC drop"],
            choice_rows,
            "regret: -"
            if reg is None
            else f"regret: ASR {100 * reg.asr:+.2f} points, ACC drop {100 * reg.acc_drop:+.2f} points",
        )
    )
    params = varying_params(done)
    importance_rows = []
    for target in ("asr", "acc"):
        try:
            with warnings.catch_warnings():  # PED-ANOVA on a handful of trials warns of ties
                warnings.simplefilter("ignore", UserWarning)
                found = analysis.hyperparameter_importance(done, params, target)
            importance_rows.append([target] + [f"{found[p]:.3f}" for p in params])
        except ValueError as err:
            section.notes.append(f"importance for {target}: not computable ({err}).")
    if importance_rows:
        section.tables.append(
            Table("hyperparameter importance (PED-ANOVA)", ["target", *params], importance_rows)
        )
    flagged = []
    if num_classes is not None:
        flagged = [r for r in done if analysis.collapsed(float(r["acc"]), num_classes)]
    section.notes.append(
        "collapsed trials (ACC near chance): "
        + (", ".join(f"#{r.get('trial')} (ACC {100 * r['acc']:.1f})" for r in flagged) or "none")
    )
    front = pareto_rows(done, objectives)
    section.notes.append(
        "validation Pareto front ("
        + ", ".join(f"val_{k} {v}" for k, v in objectives.items())
        + "): "
        + ", ".join(f"#{r.get('trial')}" for r in front)
    )
    section.figures.append(
        ("ACC vs ASR (report half)", _scatter_png(done, front, mine, oracle, flagged, section))
    )
    for p in params:
        section.figures.append((f"sensitivity to {p}", _sensitivity_png(done, p)))
    return section


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter_png(
    done: Sequence[Row],
    front: Sequence[Row],
    mine: Row | None,
    oracle: Row | None,
    flagged: Sequence[Row],
    section: Section,
) -> bytes:
    """The cell's Pareto plot in the ACC-ASR plane (where the logistic curve is fitted, whatever the
    objectives), with the collapsed trials and both choices marked."""
    _pyplot()
    marks = [Mark(r, "collapsed", "v", "k", 30) for r in flagged]
    marks += [
        Mark(r, label, m, c, 120)
        for r, label, m, c in ((mine, "defender", "*", "tab:blue"), (oracle, "oracle", "D", "tab:orange"))
        if r is not None
    ]
    fig, ax = front_figure(done, front, DEFAULT_OBJECTIVES, marks)
    asr = np.array([float(r["asr"]) for r in done])
    acc = np.array([float(r["acc"]) for r in done])
    try:
        from scipy.optimize import OptimizeWarning

        with warnings.catch_warnings():  # 4 parameters on a handful of points: no covariance
            warnings.simplefilter("ignore", OptimizeWarning)
            fit = analysis.fit_logistic(acc, asr)
        xs = np.linspace(float(asr.min()), float(asr.max()), 100)
        ax.plot(xs, fit(xs), c="tab:green", label=f"logistic fit (RMSE {fit.rmse:.3f})")
        ax.legend(fontsize=6, loc="best")
        section.notes.append(
            "logistic fit: "
            + ", ".join(f"{k} {v:.3g}" for k, v in fit.params.items())
            + f", RMSE {fit.rmse:.3g}"
        )
    except ValueError as err:
        section.notes.append(f"logistic fit: not computable ({err}).")
    return _png(fig)


def _sensitivity_png(done: Sequence[Row], param: str) -> bytes:
    plt = _pyplot()
    curve = analysis.sensitivity(done, param)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    numeric = all(isinstance(c["low"], int | float) and not isinstance(c["low"], bool) for c in curve)
    xs = [(c["low"] + c["high"]) / 2 for c in curve] if numeric else list(range(len(curve)))
    for ax, name in zip(axes, ("acc", "asr"), strict=True):
        med = [c[f"{name}_median"] for c in curve]
        ax.plot(xs, med, marker="o")
        ax.fill_between(xs, [c[f"{name}_q1"] for c in curve], [c[f"{name}_q3"] for c in curve], alpha=0.3)
        ax.set_xlabel(param)
        ax.set_ylabel(f"{name.upper()} (report half): median, IQR")
        if not numeric:
            ax.set_xticks(xs, [str(c["value"]) for c in curve], fontsize=6)
    fig.tight_layout()
    return _png(fig)


# --- the report -----------------------------------------------------------------------------------


@dataclass
class Report:
    sweep: str
    generation: int
    objectives: dict[str, str]
    tables: list[Table]
    notes: list[str]
    sections: list[Section]


def build_report(
    rows: Sequence[Row],
    sweep: str,
    objectives: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    resamples: int = 10_000,
) -> Report:
    """The report of the newest generation's rows; `num_classes` None: from the dataset's name
    where it is a registered one (`KNOWN_CLASSES`)."""
    objectives = dict(objectives or DEFAULT_OBJECTIVES)
    rows = newest_generation(rows)
    generation = int(rows[0].get("generation") or 1) if rows else 1
    tables = acc_asr_tables(rows, default_rows(rows), "default configuration")
    tuned = tuned_rows(rows, objectives)
    tables += acc_asr_tables(rows, tuned, "tuned configuration (chosen on the validation half)")
    notes = [tuned_rule(objectives)]
    amplified = amplified_tables(rows, default_rows(rows), "default configuration")
    amplified += amplified_tables(rows, tuned, "tuned configuration")
    if amplified:
        tables += amplified
    else:
        notes.append("amplified-trigger table omitted: no trial measured asr_x4, asr_x5 or asr_x9.")
    sections = []
    for cell_rows in analysis.group_rows(rows, "cell").values():
        if not any(r.get("design") for r in cell_rows):
            continue
        classes = num_classes or KNOWN_CLASSES.get(str(cell_rows[0].get("dataset")))
        sections.append(study_section(cell_rows, objectives, classes, resamples))
    return Report(sweep, generation, objectives, tables, notes, sections)


def _md_table(t: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"### {t.title}", "", "| " + " | ".join(map(esc, t.header)) + " |"]
    lines.append("|" + "---|" * len(t.header))
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in t.rows]
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines) + "\n"


def to_markdown(report: Report) -> str:
    out = [f"# Sweep {report.sweep} (generation {report.generation})", ""]
    out += [f"- {n}" for n in report.notes] + [""]
    out += [_md_table(t) for t in report.tables]
    for s in report.sections:
        out += [f"## Study cell {s.title}", ""]
        out += [_md_table(t) for t in s.tables]
        out += [f"- {n}" for n in s.notes] + [""]
    return "\n".join(out)


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def _tex(text: str) -> str:
    escaped = "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)
    return escaped.replace("±", r"$\pm$")


def _tex_table(t: Table) -> str:
    lines = [
        f"% {t.title}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(t.title)}}}",
        r"\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}",
        r"\toprule",
        " & ".join(map(_tex, t.header)) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(map(_tex, r)) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def to_latex(report: Report) -> str:
    """Every table as a booktabs `tabular` (`\\usepackage{booktabs}`) in a `table` float."""
    head = f"% bdlab report: sweep {report.sweep}, generation {report.generation}; needs \\usepackage{{booktabs}}\n"
    tables = report.tables + [t for s in report.sections for t in s.tables]
    return head + "\n".join(_tex_table(t) for t in tables)


def _html_table(t: Table) -> str:
    e = html.escape
    parts = [
        f"<h3>{e(t.title)}</h3>",
        "<table>",
        "<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr>",
    ]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in t.rows]
    parts.append("</table>")
    if t.note:
        parts.append(f"<p class='note'>{e(t.note)}</p>")
    return "\n".join(parts)


def to_html(report: Report) -> str:
    """One file with nothing external: styles inline, figures as base64 PNG data URIs."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html><head><meta charset='utf-8'>",
        f"<title>bdlab report: {e(report.sweep)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #bbb;padding:.2em .5em;text-align:right}td:first-child{text-align:left}"
        ".note{color:#555;font-size:90%}</style></head><body>",
        f"<h1>Sweep {e(report.sweep)} (generation {report.generation})</h1>",
        "<ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>",
        "<h2>Tables</h2>",
    ]
    parts += [_html_table(t) for t in report.tables]
    for s in report.sections:
        parts.append(f"<h2>Study cell {e(s.title)}</h2>")
        parts += [_html_table(t) for t in s.tables]
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in s.notes) + "</ul>")
        for title, png in s.figures:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
            parts.append(f"<figcaption>{e(title)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Every trial (every generation) with the Parquet table's columns, in its order."""
    from bdlab.report import table_schema

    columns = table_schema().names
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else _csv_value(r.get(c)) for c in columns])


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def write_report(report: Report, rows: Sequence[Row], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in REPORT_FILES]
    paths[0].write_text(to_html(report), encoding="utf-8")
    paths[1].write_text(to_markdown(report), encoding="utf-8")
    paths[2].write_text(to_latex(report), encoding="utf-8")
    write_csv(rows, paths[3])
    return paths


# --- from the tracking store ----------------------------------------------------------------------


def parent_run_id(tracker: Any, sweep: str) -> str | None:
    """The newest generation's parent run of the sweep, or None."""
    from bdlab.tracking import schema

    exp = tracker.find_experiment(schema.sweep_experiment(sweep))
    if exp is None:
        return None
    runs = tracker.find_runs([exp], {schema.KIND: "sweep", schema.SWEEP: sweep}, statuses=None)
    if not runs:
        return None
    return max(runs, key=lambda r: int(r.tags.get(schema.GENERATION, 0))).run_id


def spec_objectives(tracker: Any, run_id: str) -> dict[str, str]:
    """The objectives of the spec the sweep logged to its parent run (its YAML artifact); the
    spec's default when none was logged."""
    import yaml

    for name in tracker.list_artifacts(run_id):
        if name.endswith((".yaml", ".yml")):
            with tempfile.TemporaryDirectory() as tmp:
                data = yaml.safe_load(tracker.download_folder(run_id, name, tmp).read_text())
            if isinstance(data, dict) and isinstance(data.get("objectives"), dict):
                return {str(k): str(v) for k, v in data["objectives"].items()}
    return dict(DEFAULT_OBJECTIVES)


def report_sweep(tracker: Any, sweep: str, out: str | Path, num_classes: int | None = None) -> list[Path]:
    """Write the sweep's four report files into `out` and log them under `report/` on its parent run."""
    from bdlab.report import trial_rows

    rows = trial_rows(tracker, sweep)  # an unknown sweep: InvalidValue listing the store's sweeps
    parent = parent_run_id(tracker, sweep)
    objectives = spec_objectives(tracker, parent) if parent else dict(DEFAULT_OBJECTIVES)
    report = build_report(rows, sweep, objectives, num_classes)
    paths = write_report(report, rows, out)
    if parent is not None:
        for p in paths:
            tracker.log_artifact(parent, p, ARTIFACT_PATH)
    return paths
