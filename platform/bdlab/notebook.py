"""Helpers behind notebooks/browse.ipynb and notebooks/robustness.ipynb, kept here so the notebooks
stay a few lines a cell and the logic is tested (tests/test_notebooks.py runs both notebooks).

The store is the platform's: `MLFLOW_TRACKING_URI` (with `MLFLOW_TRACKING_USERNAME`/`PASSWORD` for a
team server, read by MLflow itself), else the SQLite store of the results folder (`BDLAB_RESULTS`,
default ./results). Everything read from a run's artifacts is PNG, YAML, JSON or safetensors:
nothing is unpickled.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bdlab.tracking import Store, Tracker, schema
from trials.errors import InvalidValue

Row = dict[str, Any]

# the columns a cell table shows, in order; the rest of trial_rows stays in the rows
CELL_COLUMNS = (
    "trial",
    "default_config",
    "configuration",
    "defense_seed",
    "data_subset",
    "params",
    "status",
    "acc",
    "asr",
    "val_acc",
    "val_asr",
    "before_acc",
    "before_asr",
)
FILTER_FIELDS = ("dataset", "model", "attack", "defense", "cell", "status")


def open_store(results: str | Path | None = None) -> Store:
    """The store the platform resolves: `MLFLOW_TRACKING_URI` if set, else the results folder's
    SQLite DB (`results`, else `BDLAB_RESULTS`, else ./results). A results folder without a store
    is an error, not a new empty store (a notebook runs in its own folder, not the repository's)."""
    folder = Path(results or os.environ.get("BDLAB_RESULTS") or "results")
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (folder / "mlflow.db").is_file():
        field = "results" if results else "BDLAB_RESULTS"
        raise InvalidValue(
            field, str(folder.resolve()), "a results folder holding mlflow.db (or set MLFLOW_TRACKING_URI)"
        )
    return Store.open(folder)


def list_sweeps(tracker: Tracker) -> list[Row]:
    """Every sweep of the store, oldest first (by its newest parent run's start): name, newest
    generation, its defense trials by status, and the parent run's start (epoch ms)."""
    out = []
    for name in schema.sweep_names(tracker.experiment_names()):
        exp = tracker.find_experiment(schema.sweep_experiment(name))
        parents = tracker.find_runs([exp], {schema.KIND: "sweep", schema.SWEEP: name}, statuses=None)
        newest = max(parents, key=lambda r: int(r.tags.get(schema.GENERATION, 0)), default=None)
        generation = int(newest.tags.get(schema.GENERATION, 1)) if newest else 1
        trials = tracker.find_runs(
            [exp], {schema.SWEEP: name, schema.PHASE: "defense", schema.GENERATION: generation}, statuses=None
        )
        counts: dict[str, int] = {}
        for t in trials:
            status = t.tags.get(schema.STATUS, t.status.lower())
            counts[status] = counts.get(status, 0) + 1
        out.append(
            {
                "sweep": name,
                "generation": generation,
                "trials": len(trials),
                **{s: counts.get(s, 0) for s in ("complete", "failed", "running")},
                "started": newest.start_time if newest else None,
            }
        )
    return sorted(out, key=lambda s: (s["started"] or 0, s["sweep"]))


def pick_sweep(tracker: Tracker, sweep: str | None = None) -> str:
    """`sweep` (else `BDLAB_SWEEP`, else the newest sweep), checked against the store's sweeps."""
    sweeps = [s["sweep"] for s in list_sweeps(tracker)]
    chosen = sweep or os.environ.get("BDLAB_SWEEP") or (sweeps[-1] if sweeps else None)
    if chosen not in sweeps:
        field = "sweep" if sweep else "BDLAB_SWEEP"
        raise InvalidValue(field, chosen, f"sweeps in {tracker.uri}: {', '.join(sweeps) or 'none'}")
    return chosen


def filter_rows(rows: Sequence[Row], **where: Any) -> list[Row]:
    """The rows whose every given field contains the given text (`defense="ft"`, `cell="s0"`);
    fields: FILTER_FIELDS."""
    bad = sorted(set(where) - set(FILTER_FIELDS))
    if bad:
        raise InvalidValue("filter", bad[0], f"one of {', '.join(FILTER_FIELDS)}")
    return [r for r in rows if all(str(v) in str(r.get(k) or "") for k, v in where.items())]


def cells(rows: Sequence[Row]) -> list[str]:
    """The cells of the rows, in first-seen order."""
    return list(dict.fromkeys(str(r["cell"]) for r in rows))


def cell_table(rows: Sequence[Row], columns: Sequence[str] = CELL_COLUMNS) -> Any:
    """One line per trial with `columns`: a pandas DataFrame where pandas is installed, else a list
    of dicts."""
    records = [{c: r.get(c) for c in columns} for r in rows]
    return frame(records, columns)


def frame(records: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return [dict(r) for r in records]
    return pd.DataFrame(list(records), columns=list(columns) if columns else None)


@contextmanager
def _own_backend() -> Iterator[None]:
    """Keep the notebook's matplotlib backend: `bdlab.reporting` draws its figures under Agg and
    switches to it, after which `plt.show()` in a notebook would draw nothing (IPython drops its
    figure formatter on the switch, so a plain switch back is not enough)."""
    import matplotlib

    before = matplotlib.get_backend()
    try:
        yield
    finally:
        if matplotlib.get_backend() != before:
            import matplotlib.pyplot as plt

            shell = _ipython()
            if shell is not None and before.endswith("backend_inline"):
                shell.enable_matplotlib("inline")
            else:
                plt.switch_backend(before)


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def report_tables(rows: Sequence[Row], sweep: str) -> list[tuple[str, Any]]:
    """The paper-style ACC/ASR tables of `bdlab report` (default and tuned configuration), each as
    (title, table)."""
    from bdlab import reporting

    with _own_backend():
        report = reporting.build_report(rows, sweep, resamples=200)
    return [
        (t.title, frame([dict(zip(t.header, line, strict=True)) for line in t.rows], t.header))
        for t in report.tables
    ]


def _download(tracker: Tracker, run_id: str, path: str, dest: Path) -> Path:
    return tracker.download_folder(run_id, path, dest)


def attacked_run(tracker: Tracker, row: Row) -> str:
    """The attack run holding the trial's attacked model."""
    from bdlab.cache import find_attacked

    run_id = find_attacked(tracker, str(row.get("cache_key")))
    if run_id is None:
        raise InvalidValue("cache_key", row.get("cache_key"), f"a finished attack run in {tracker.uri}")
    return run_id


def trigger_images(tracker: Tracker, row: Row) -> dict[str, Any]:
    """The trial's trigger as images (RGB arrays): `trigger.png` and `trigger_examples.png` of its
    attacked model, those the attack wrote."""
    import matplotlib.image as mpimg

    run_id = attacked_run(tracker, row)
    from bdlab.cache import ATTACKED_ARTIFACT

    names = [n for n in tracker.list_artifacts(run_id, ATTACKED_ARTIFACT) if n.endswith(".png")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(names):
            out[Path(name).name] = mpimg.imread(_download(tracker, run_id, name, Path(tmp)))
    return out


def pareto_figure(rows: Sequence[Row], objectives: Mapping[str, str] | None = None) -> Any:
    """A cell's trials on the axes of the objectives (report half), each labelled with its trial
    number, with the validation Pareto front (what a defender can pick from) marked; a matplotlib
    Figure."""
    from bdlab import analysis, reporting
    from bdlab.figures import front_figure

    done = analysis.complete_rows(rows)
    front = reporting.pareto_rows(done, dict(objectives or reporting.DEFAULT_OBJECTIVES))
    title = str(done[0]["cell"]) if done else "no complete trial"
    fig, _ = front_figure(done, front, objectives, title=title, labels=[str(r["trial"]) for r in done])
    return fig


def load_defended_model(tracker: Tracker, row: Row, dest: str | Path, device: str = "cpu") -> Any:
    """The trial's defended model, loaded into its attacked-model folder (`trials.run.AttackedModel`
    with `model` the defended weights, `backdoored` the attacked ones): the attacked folder and the
    trial's `defended/` artifact are downloaded under `dest`; weights are read as safetensors."""
    from bdlab.cache import fetch_attacked
    from trials.run import load_attacked

    if row.get("status") != "complete":
        raise InvalidValue("trial", row.get("trial"), f"a complete trial (this one is {row.get('status')})")
    dest = Path(dest)
    folder = fetch_attacked(tracker, attacked_run(tracker, row), dest / "attacked")
    defended = _download(
        tracker, str(row["mlflow_run_id"]), "defended", dest / "trials" / str(row["mlflow_run_id"])
    )
    return load_attacked(folder, device, weights=defended / "model.safetensors")


def param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def study_sections(rows: Sequence[Row], tracker: Tracker, sweep: str, resamples: int = 2000) -> list[Any]:
    """`bdlab report`'s study sections (robustness table, defender vs oracle, importance, notes and
    figures as PNG bytes) of the sweep's newest generation, under the objectives its spec logged."""
    from bdlab import reporting

    parent = reporting.parent_run_id(tracker, sweep)
    objectives = reporting.spec_objectives(tracker, parent) if parent else None
    with _own_backend():
        return reporting.build_report(rows, sweep, objectives, resamples=resamples).sections


def study_rows(rows: Sequence[Row]) -> list[Row]:
    """The complete study trials of the newest generation, every parameter filled in (a default
    configuration records only its overrides)."""
    from bdlab import analysis, reporting

    done = analysis.complete_rows(reporting.newest_generation(rows))
    return reporting.with_full_params([r for r in done if r.get("design")])


def success_grid(
    rows: Sequence[Row], max_asr: Sequence[float] = (0.05, 0.2), max_acc_drop: Sequence[float] = (0.02, 0.1)
) -> Any:
    """The success rate (percent of trials, `analysis.success_rate`) under each pair of thresholds
    (fractions), per study cell."""
    from bdlab import analysis, reporting

    records = []
    for cell, members in analysis.group_rows(rows, "cell").items():
        classes = reporting.KNOWN_CLASSES.get(str(members[0].get("dataset")))
        for a in max_asr:
            for d in max_acc_drop:
                rate = analysis.success_rate(members, num_classes=classes, max_asr=a, max_acc_drop=d)
                records.append({"cell": cell, "max ASR": a, "max ACC drop": d, "success %": 100 * rate})
    return frame(records, ["cell", "max ASR", "max ACC drop", "success %"])


def sensitivity_figure(rows: Sequence[Row], param: str) -> Any:
    """Median and interquartile range of report-half ACC and ASR per value (or bin) of `param`."""
    import matplotlib.pyplot as plt

    from bdlab import analysis

    curve = analysis.sensitivity(rows, param)
    if not curve:
        raise InvalidValue("param", param, "a parameter the complete trials ran with")
    labels = [f"{c['low']:.3g}-{c['high']:.3g}" if c["value"] is None else str(c["value"]) for c in curve]
    xs = list(range(len(curve)))
    fig, ax = plt.subplots(figsize=(5, 3))
    for name in ("acc", "asr"):
        ax.plot(xs, [c[f"{name}_median"] for c in curve], marker="o", label=f"{name.upper()} median")
        ax.fill_between(xs, [c[f"{name}_q1"] for c in curve], [c[f"{name}_q3"] for c in curve], alpha=0.25)
    ax.set_xticks(xs, labels, fontsize=6)
    ax.set_xlabel(param)
    ax.set_ylabel("report half")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
