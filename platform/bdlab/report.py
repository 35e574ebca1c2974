"""A sweep's results: the summary per cell, the Pareto plots, and the Parquet table.

The Pareto front of a cell is its Optuna study's (the validation half: what the search saw); every
figure a table shows beside it is the report half, which nothing was selected on.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from bdlab.tracking import Store, find_runs, sweep_experiment_name
from trials.errors import InvalidValue

if TYPE_CHECKING:
    from bdlab.sweep import SweepRun

METRICS = ("acc", "asr", "asr_cond", "ra", "asr_x4", "asr_x5", "asr_x9")
ALL_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")

# The Parquet table's columns, in order (README "The results table" documents each).
SCHEMA = pa.schema(
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
        ("params", pa.string()),  # JSON object: every parameter override the trial ran with
        ("status", pa.string()),  # complete | failed | running
        ("failure", pa.string()),
        *[(m, pa.float64()) for m in METRICS],  # report half
        *[(f"val_{m}", pa.float64()) for m in METRICS],  # validation half (what the search saw)
        ("before_acc", pa.float64()),
        ("before_asr", pa.float64()),
        ("seconds", pa.float64()),  # the defense's own run time
        ("started", pa.timestamp("ms", tz="UTC")),
        ("ended", pa.timestamp("ms", tz="UTC")),
        ("duration_s", pa.float64()),  # wall time of the MLflow run (loading and logging included)
        ("mlflow_run_id", pa.string()),
    ]
)


def trial_rows(store: Store, sweep: str) -> list[dict[str, Any]]:
    """One row per defense trial of the sweep (every generation), from MLflow alone."""
    found = store.client().get_experiment_by_name(sweep_experiment_name(sweep))
    if found is None:
        known = sorted(
            e.name.removeprefix("bdlab/")
            for e in store.client().search_experiments()
            if e.name.startswith("bdlab/") and e.name != "bdlab/attacked-models"
        )
        raise InvalidValue("sweep", sweep, f"sweeps in {store.tracking_uri}: {', '.join(known) or 'none'}")
    exp = found.experiment_id
    runs = find_runs(store, [exp], {"bdlab.sweep": sweep, "bdlab.phase": "defense"}, statuses=ALL_STATUSES)
    rows = []
    for r in runs:
        tags, metrics, params = r.data.tags, r.data.metrics, r.data.params
        start, end = r.info.start_time, r.info.end_time
        row = {
            "sweep": sweep,
            "generation": int(tags.get("bdlab.generation", 1)),
            "study": tags.get("bdlab.study"),
            "trial": int(tags.get("bdlab.trial", -1)),
            "default_config": tags.get("bdlab.default") == "true",
            "dataset": tags.get("bdlab.dataset"),
            "model": tags.get("bdlab.model"),
            "attack": tags.get("bdlab.attack"),
            "defense": tags.get("bdlab.defense"),
            "cell": tags.get("bdlab.cell"),
            "cache_key": tags.get("bdlab.cache_key"),
            "params": json.dumps({k: v for k, v in sorted(params.items()) if k != "defense"}),
            "status": tags.get("bdlab.status", r.info.status.lower()),
            "failure": tags.get("bdlab.failure"),
            "seconds": metrics.get("seconds"),
            "before_acc": metrics.get("before_acc"),
            "before_asr": metrics.get("before_asr"),
            "started": start,
            "ended": end,
            "duration_s": (end - start) / 1000 if start and end else None,
            "mlflow_run_id": r.info.run_id,
        }
        for m in METRICS:
            row[m] = metrics.get(m)
            row[f"val_{m}"] = metrics.get(f"val_{m}")
        rows.append(row)
    rows.sort(key=lambda x: (x["generation"], x["study"] or "", x["trial"]))
    return rows


def export(store: Store, sweep: str, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(store, sweep)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, out)
    return out


# --- the summary ---------------------------------------------------------------------------------


def summarize(run: SweepRun) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from bdlab.studies import DEFAULT_ATTR, study_name

    spec, store = run.spec, run.store
    children = {
        (r.data.tags.get("bdlab.study"), r.data.tags.get("bdlab.trial")): r
        for r in find_runs(
            store,
            [run.experiment_id],
            {"bdlab.sweep": spec.name, "bdlab.phase": "defense", "bdlab.generation": str(run.generation)},
            statuses=ALL_STATUSES,
        )
    }
    cells = []
    for cell in spec.defense_cells():
        name = study_name(spec.name, run.generation, cell)
        study = optuna.load_study(study_name=name, storage=store.optuna_url)
        trials = study.get_trials(deepcopy=False)
        key = run.keys[spec.attack_cells.index(cell.attack)]
        attack_run = store.client().get_run(run.attacked[key])

        def point(t, name=name) -> dict[str, Any]:
            r = children.get((name, str(t.number)))
            m = r.data.metrics if r is not None else {}
            return {
                "trial": t.number,
                "val": dict(zip(spec.objectives, t.values or [], strict=False)),
                "report": {k: m.get(k) for k in ("acc", "asr")},
                "params": json.loads(t.user_attrs.get("bdlab.params", "{}")),
                "mlflow_run_id": r.info.run_id if r is not None else None,
            }

        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        default = next((t for t in complete if t.user_attrs.get(DEFAULT_ATTR)), None)
        front = study.best_trials if complete else []
        cells.append(
            {
                "cell": cell.label,
                "study": name,
                "before": {k: attack_run.data.metrics.get(k) for k in ("acc", "asr")},
                "default": point(default) if default is not None else None,
                "front": [point(t) for t in sorted(front, key=lambda t: t.number)],
                "points": [point(t) for t in complete],
                "complete": len(complete),
                "failed": sum(t.state == TrialState.FAIL for t in trials),
            }
        )
    return {
        "sweep": spec.name,
        "generation": run.generation,
        "objectives": dict(spec.objectives),
        "cells": cells,
        "tracking_uri": store.tracking_uri,
        "optuna_storage": store.optuna_url,
        "results": str(store.results),
    }


def _pair(d: dict | None) -> str:
    if not d:
        return "-"
    acc, asr = d.get("acc"), d.get("asr")
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    return f"{f(acc)}/{f(asr)}"


def summary_table(summary: dict[str, Any]) -> str:
    """The per-cell table (report half; the front is the validation half's Pareto set)."""
    head = "| cell | before ACC/ASR | default ACC/ASR | trials ok/failed | Pareto front (trial: report ACC/ASR) |"
    lines = [head, "|---|---|---|---|---|"]
    for c in summary["cells"]:
        front = ", ".join(f"#{p['trial']}: {_pair(p['report'])}" for p in c["front"]) or "-"
        default = _pair(c["default"]["report"]) if c["default"] else "-"
        lines.append(
            f"| {c['cell']} | {_pair(c['before'])} | {default} | {c['complete']}/{c['failed']} | "
            f"{len(c['front'])}: {front} |"
        )
    return "\n".join(lines)


def pareto_figure(cell: dict[str, Any], objectives: dict[str, str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    xs = [p["report"].get("asr") for p in cell["points"]]
    ys = [p["report"].get("acc") for p in cell["points"]]
    ax.scatter(xs, ys, c="0.6", s=18, label="trials")
    fx = [p["report"].get("asr") for p in cell["front"]]
    fy = [p["report"].get("acc") for p in cell["front"]]
    ax.scatter(fx, fy, c="tab:red", s=30, label="Pareto front (chosen on the validation half)")
    if cell["default"]:
        d = cell["default"]["report"]
        ax.scatter(
            [d.get("asr")], [d.get("acc")], marker="*", s=160, c="tab:blue", label="default configuration"
        )
    b = cell["before"]
    ax.scatter([b.get("asr")], [b.get("acc")], marker="x", s=60, c="k", label="backdoored model")
    ax.set_xlabel("ASR (report half)")
    ax.set_ylabel("ACC (report half)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(cell["cell"], fontsize=8)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    return fig


def publish(run: SweepRun, summary: dict[str, Any], out) -> None:
    """Print the summary and log it, the plots and the Parquet table to the sweep's parent run."""
    import matplotlib.pyplot as plt

    store = run.store
    client = store.client()
    table = summary_table(summary)
    parquet = export(store, run.spec.name, store.results / f"{run.spec.name}.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "summary.md").write_text(table + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifact(run.parent_run_id, str(tmp / "summary.md"))
        client.log_artifact(run.parent_run_id, str(tmp / "summary.json"))
        client.log_artifact(run.parent_run_id, str(parquet))
        for i, cell in enumerate(summary["cells"]):
            if not cell["points"]:
                continue
            fig = pareto_figure(cell, summary["objectives"])
            path = tmp / f"pareto_{i:02d}_{_safe(cell['cell'])}.png"
            fig.savefig(path)
            plt.close(fig)
            client.log_artifact(run.parent_run_id, str(path), "pareto")
    out("")
    out(
        f"summary of sweep {run.spec.name} (generation {run.generation}); report half, Pareto front on the validation half:"
    )
    out(table)
    out("")
    out(f"results table: {parquet}")
    out(
        f"MLflow: {store.tracking_uri} (experiment {sweep_experiment_name(run.spec.name)}, parent run {run.parent_run_id})"
    )
    if store.tracking_uri.startswith("sqlite"):
        out(f"open it with: bdlab ui --results {store.results}")
    out(f"Optuna studies: {store.optuna_url} (optuna-dashboard {store.optuna_url})")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]
