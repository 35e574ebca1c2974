"""A sweep's results: the summary per cell, the Pareto plots, and the Parquet table.

The Pareto front of a cell is its Optuna study's (the validation half: what the search saw); every
figure a table shows beside it is the report half, which nothing was selected on.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bdlab.spec.reader import DEFAULT_OBJECTIVES
from bdlab.tracking import RUN_STATUSES, Store, Tracker, schema
from bdlab.tracking.store import hide_password
from trials.errors import InvalidValue


@dataclass(frozen=True)
class SweepRef:
    """The sweep a report is about: its generation and parent run."""

    name: str
    generation: int
    experiment_id: str
    parent_run_id: str
    objectives: dict[str, str]  # metric -> max | min, the studies' directions


@dataclass(frozen=True)
class CellRef:
    """One defense cell of the sweep: its label, its Optuna study and its attacked model's run."""

    label: str
    study: str
    attacked_run_id: str


def table_schema() -> pa.Schema:
    """The Parquet table's columns, in order (README "The results table" documents each); one
    column per registered metric, for the report and the validation half."""
    return pa.schema(
        [
            ("sweep", pa.string()),
            ("generation", pa.int32()),
            ("study", pa.string()),
            ("trial", pa.int32()),
            ("default_config", pa.bool_()),
            ("dataset", pa.string()),
            ("model", pa.string()),
            ("attack", pa.string()),
            ("defense", pa.string()),
            ("cell", pa.string()),
            ("cache_key", pa.string()),
            ("design", pa.string()),  # a study trial's design (sobol | grid); null for a search trial
            ("configuration", pa.int32()),  # its configuration (0: the default); null for a search trial
            ("defense_seed", pa.int64()),  # its defense seed; null for a search trial
            ("data_fraction", pa.float64()),  # its clean-data budget, when the study sets budgets
            ("data_subset", pa.int32()),  # its held-out subset; null for a search trial
            ("params", pa.string()),  # JSON object: every parameter override the trial ran with
            ("status", pa.string()),  # complete | failed | running
            ("failure", pa.string()),
            *[(m, pa.float64()) for m in schema.metric_columns()],  # report half, then val_*
            ("before_acc", pa.float64()),
            ("before_asr", pa.float64()),
            ("seconds", pa.float64()),  # the defense's own run time
            ("started", pa.timestamp("ms", tz="UTC")),
            ("ended", pa.timestamp("ms", tz="UTC")),
            ("duration_s", pa.float64()),  # wall time of the MLflow run (loading and logging included)
            ("mlflow_run_id", pa.string()),
        ]
    )


def trial_rows(tracker: Tracker, sweep: str) -> list[dict[str, Any]]:
    """One row per defense trial of the sweep (every generation), from the tracking store alone."""
    exp = tracker.find_experiment(schema.sweep_experiment(sweep))
    if exp is None:
        known = schema.sweep_names(tracker.experiment_names())
        raise InvalidValue("sweep", sweep, f"sweeps in {tracker.uri}: {', '.join(known) or 'none'}")
    runs = tracker.find_runs([exp], {schema.SWEEP: sweep, schema.PHASE: "defense"}, statuses=RUN_STATUSES)
    rows = []
    for r in runs:
        tags, metrics = r.tags, r.metrics
        start, end = r.start_time, r.end_time
        row = {
            "sweep": sweep,
            "generation": int(tags.get(schema.GENERATION, 1)),
            "study": tags.get(schema.STUDY),
            "trial": int(tags.get(schema.TRIAL, -1)),
            "default_config": tags.get(schema.DEFAULT) == "true",
            "dataset": tags.get(schema.DATASET),
            "model": tags.get(schema.MODEL),
            "attack": tags.get(schema.ATTACK),
            "defense": tags.get(schema.DEFENSE),
            "cell": tags.get(schema.CELL),
            "cache_key": tags.get(schema.CACHE_KEY),
            "design": tags.get(schema.DESIGN),
            "configuration": _int_tag(tags, schema.CONFIGURATION),
            "defense_seed": _int_tag(tags, schema.DEFENSE_SEED),
            "data_fraction": float(tags[schema.DATA_FRACTION]) if schema.DATA_FRACTION in tags else None,
            "data_subset": _int_tag(tags, schema.DATA_SUBSET),
            "params": json.dumps({k: v for k, v in sorted(r.params.items()) if k != "defense"}),
            "status": tags.get(schema.STATUS, r.status.lower()),
            "failure": tags.get(schema.FAILURE),
            "seconds": metrics.get("seconds"),
            "before_acc": metrics.get("before_acc"),
            "before_asr": metrics.get("before_asr"),
            "started": start,
            "ended": end,
            "duration_s": (end - start) / 1000 if start and end else None,
            "mlflow_run_id": r.run_id,
        }
        row.update({m: metrics.get(m) for m in schema.metric_columns()})
        rows.append(row)
    rows.sort(key=lambda x: (x["generation"], x["study"] or "", x["trial"]))
    return rows


def _int_tag(tags: dict[str, str], key: str) -> int | None:
    return int(tags[key]) if key in tags else None


def export(tracker: Tracker, sweep: str, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(tracker, sweep)
    table = pa.Table.from_pylist(rows, schema=table_schema())
    pq.write_table(table, out)
    return out


# --- the summary ---------------------------------------------------------------------------------


def summarize(store: Store, sweep: SweepRef, cells: list[CellRef]) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from bdlab.analysis import collapsed
    from bdlab.reporting import KNOWN_CLASSES
    from bdlab.studies import DEFAULT_ATTR, PARAMS_ATTR
    from trials.metrics import defense_metric_keys, metric_keys

    tracker = store.tracker()
    keys = defense_metric_keys()  # a defense trial's; the backdoored model's are metric_keys()
    children = {
        (r.tags.get(schema.STUDY), r.tags.get(schema.TRIAL)): r
        for r in tracker.find_runs(
            [sweep.experiment_id],
            {schema.SWEEP: sweep.name, schema.PHASE: "defense", schema.GENERATION: str(sweep.generation)},
            statuses=RUN_STATUSES,
        )
    }
    summaries = []
    for cell in cells:
        study = optuna.load_study(study_name=cell.study, storage=store.optuna_url)
        trials = study.get_trials(deepcopy=False)
        attacked = tracker.get_run(cell.attacked_run_id)
        before = attacked.metrics
        # attacked models trained before the tag existed: the classes of the datasets known by name
        tags = attacked.tags
        classes = int(tags.get(schema.NUM_CLASSES) or KNOWN_CLASSES.get(tags.get(schema.DATASET, ""), 0))
        if classes and collapsed(before.get("acc", 0.0), classes):
            classes = 0  # the backdoored model itself is at chance: no defense collapsed it

        def point(t: Any, study_name: str = cell.study, classes: int = classes) -> dict[str, Any]:
            r = children.get((study_name, str(t.number)))
            m = r.metrics if r is not None else {}
            return {
                "trial": t.number,
                "val": dict(zip(sweep.objectives, t.values or [], strict=False)),
                "report": {k: m.get(k) for k in keys},
                "params": json.loads(t.user_attrs.get(PARAMS_ATTR, "{}")),
                "mlflow_run_id": r.run_id if r is not None else None,
                # ACC at chance: the model predicts one class, and its low ASR means nothing
                "collapsed": bool(classes) and m.get("acc") is not None and collapsed(m["acc"], classes),
            }

        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        default = next((t for t in complete if t.user_attrs.get(DEFAULT_ATTR)), None)
        front = study.best_trials if complete else []
        summaries.append(
            {
                "cell": cell.label,
                "study": cell.study,
                "before": {k: before.get(k) for k in metric_keys()},
                "default": point(default) if default is not None else None,
                "front": [point(t) for t in sorted(front, key=lambda t: t.number)],
                "points": [point(t) for t in complete],
                "complete": len(complete),
                "failed": sum(t.state == TrialState.FAIL for t in trials),
            }
        )
    return {
        "sweep": sweep.name,
        "generation": sweep.generation,
        "objectives": dict(sweep.objectives),
        "cells": summaries,
        "tracking_uri": store.tracking_uri,
        "optuna_storage": store.optuna_url,
        "results": str(store.results),
    }


def _values(d: dict | None, metrics: list[str]) -> str:
    if not d:
        return "-"
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    return "/".join(f(d.get(m)) for m in metrics)


def _shown(summary: dict[str, Any]) -> list[str]:
    """The metrics a summary shows: the spec's objectives (ACC and ASR by default)."""
    return list(summary.get("objectives") or DEFAULT_OBJECTIVES)


def summary_table(summary: dict[str, Any]) -> str:
    """The per-cell table of the objectives' metrics (report half; the front is the validation
    half's Pareto set). The lines under it say what each metric is."""
    from trials.metrics import metric_descriptions

    shown = _shown(summary)
    names = "/".join(m.upper() if len(m) <= 4 else m for m in shown)
    head = f"| cell | before {names} | default {names} | trials ok/failed | Pareto front (trial: report {names}) |"
    lines = [head, "|---|---|---|---|---|"]
    from bdlab.analysis import COLLAPSE_MARGIN

    def mark(point: dict[str, Any]) -> str:
        return " collapsed" if point.get("collapsed") else ""

    collapses = False
    for c in summary["cells"]:
        front = ", ".join(f"#{p['trial']}: {_values(p['report'], shown)}{mark(p)}" for p in c["front"]) or "-"
        front = f"{len(c['front'])}: {front}"
        if c["complete"] and all(p.get("collapsed") for p in c.get("points", [])):
            front = f"none: all {c['complete']} trials collapsed, the method does not work on this problem"
        default = _values(c["default"]["report"], shown) + mark(c["default"]) if c["default"] else "-"
        collapses = collapses or any(p.get("collapsed") for p in c.get("points", []))
        lines.append(
            f"| {c['cell']} | {_values(c['before'], shown)} | {default} | {c['complete']}/{c['failed']} | {front} |"
        )
    lines.append("")
    if collapses:
        lines.append(
            f"collapsed: report ACC within {100 * COLLAPSE_MARGIN:g} points of chance (1 / classes): the model "
            "predicts one class, so its ASR says nothing about the backdoor"
        )
    descriptions = metric_descriptions()
    directions = summary.get("objectives") or DEFAULT_OBJECTIVES
    for m in shown:
        lines.append(f"{m} ({directions[m]}): {descriptions.get(m, 'see docs/metrics.md')}")
    return "\n".join(lines)


def pareto_figure(cell: dict[str, Any], objectives: dict[str, str] | None = None) -> Any:
    """The cell's trials and validation Pareto front on the axes of the objectives (report half)."""
    import matplotlib

    matplotlib.use("Agg")
    from bdlab.figures import Mark, front_figure

    marks = [Mark(cell["before"], "backdoored model", "x", "k", 60)]
    if cell["default"]:
        marks.insert(0, Mark(cell["default"]["report"], "default configuration"))
    fig, _ = front_figure(
        [p["report"] for p in cell["points"]],
        [p["report"] for p in cell["front"]],
        objectives,
        marks,
        title=cell["cell"],
    )
    return fig


def publish(store: Store, sweep: SweepRef, summary: dict[str, Any], out: Any) -> None:
    """Print the summary and log it, the plots and the Parquet table to the sweep's parent run."""
    import matplotlib.pyplot as plt

    tracker = store.tracker()
    table = summary_table(summary)
    parquet = export(tracker, sweep.name, store.results / f"{sweep.name}.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "summary.md").write_text(table + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        for path in (tmp / "summary.md", tmp / "summary.json", parquet):
            tracker.log_artifact(sweep.parent_run_id, path)
        for i, cell in enumerate(summary["cells"]):
            if not cell["points"]:
                continue
            fig = pareto_figure(cell, summary.get("objectives"))
            path = tmp / f"pareto_{i:02d}_{_safe(cell['cell'])}.png"
            fig.savefig(path)
            plt.close(fig)
            tracker.log_artifact(sweep.parent_run_id, path, "pareto")
    out("")
    out(
        f"summary of sweep {sweep.name} (generation {sweep.generation}); report half, "
        f"Pareto front on the validation half ({', '.join(f'{k} {v}' for k, v in sweep.objectives.items())}):"
    )
    out(table)
    out("")
    out(f"results table: {parquet}")
    out(
        f"MLflow: {store.tracking_uri} (experiment {schema.sweep_experiment(sweep.name)}, parent run {sweep.parent_run_id})"
    )
    if store.tracking_uri.startswith("sqlite"):
        out(f"open it with: bdlab ui --results {store.results}")
    else:  # the runs table with the objectives as columns (the experiment's saved view)
        out(
            f"runs table: {store.tracking_uri}/#/experiments/{sweep.experiment_id}/runs"
            f"?viewStateShareKey={schema.RESULTS_VIEW}"
        )
    optuna = hide_password(store.optuna_url)
    out(f"Optuna studies: {optuna} (optuna-dashboard {optuna})")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]
