"""notebooks/: both notebooks run top to bottom (nbclient, a kernel on this interpreter) against the
session's tiny study sweep (conftest.study_sweep), a failing cell failing the test; they are stored
without outputs; and the helpers behind them (bdlab.notebook) read the same store correctly."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("browse.ipynb", "robustness.ipynb")


def test_stored_notebooks_have_no_outputs():
    for name in NAMES:
        nb = json.loads((NOTEBOOKS / name).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, name
        for cell in code:
            assert cell["outputs"] == [] and cell["execution_count"] is None, (name, cell["source"][:60])


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec that starts this interpreter, and the environment the kernel inherits: the
    worktree's packages on an absolute PYTHONPATH (the kernel runs in another folder), one thread."""
    spec = tmp_path / "jupyter" / "kernels" / "bdlab-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "bdlab", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "platform"), str(ROOT)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("MLFLOW_TRACKING_URI", "BDLAB_SWEEP", "BDLAB_RESULTS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def execute(name: str | Path, cwd: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)  # an absolute path replaces NOTEBOOKS
    client = NotebookClient(
        nb, timeout=300, kernel_name="bdlab-test", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # a failing cell raises CellExecutionError
    return nb


def test_a_failing_cell_fails_the_run(kernel_env, tmp_path):
    import nbformat
    from nbclient.exceptions import CellExecutionError
    from nbformat.v4 import new_code_cell, new_notebook

    path = tmp_path / "bad.ipynb"
    cells = [new_code_cell("x = 1"), new_code_cell("raise RuntimeError('cell two')"), new_code_cell("y = 2")]
    nbformat.write(new_notebook(cells=cells), path)
    with pytest.raises(CellExecutionError, match="cell two"):
        execute(path, tmp_path)


def text_of(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def images_of(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.sweep
def test_browse_notebook_runs_against_the_tracking_uri(study_sweep, kernel_env, tmp_path):
    # the store named by MLFLOW_TRACKING_URI, from a folder that holds no results
    kernel_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study_sweep / 'mlflow.db'}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    nb = execute("browse.ipynb", elsewhere)
    text = text_of(nb)
    assert "sweep tiny-report: 8 trials in 1 cells" in text
    assert "digits(test_subset=200,train_subset=400)/mini_resnet: default configuration" in text
    assert images_of(nb) == 2  # the trigger images, the Pareto plot
    logged = next(line for line in text.splitlines() if line.startswith("logged:"))
    evaluated = next(line for line in text.splitlines() if line.startswith("evaluated:"))
    assert logged.split(":")[1].split() == evaluated.split(":")[1].split()  # the fetched model is the trial's


@pytest.mark.sweep
def test_robustness_notebook_runs_on_the_results_folder_by_default(study_sweep, kernel_env):
    # no MLFLOW_TRACKING_URI, no BDLAB_SWEEP: ./results of the working folder, its newest sweep
    nb = execute("robustness.ipynb", study_sweep.parent)
    text = text_of(nb)
    assert "sweep tiny-report: 1 study cell(s)" in text
    assert "success rate" in text and "regret: " in text
    # bdlab report's scatter (with the fit) and lr sensitivity, then the notebook's own lr curve
    assert images_of(nb) == 3


@pytest.mark.sweep
def test_helpers_read_the_sweep(study_sweep, tmp_path, monkeypatch):
    from bdlab import notebook as nb
    from bdlab.report import trial_rows
    from bdlab.tracking import Store

    from trials.errors import InvalidValue
    from trials.models import build_model
    from trials.run import evaluate_attacked

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BDLAB_RESULTS", raising=False)
    tracker = Store.open(study_sweep).tracker()
    assert nb.open_store(study_sweep).tracking_uri == f"sqlite:///{study_sweep / 'mlflow.db'}"
    with pytest.raises(InvalidValue, match="results: .* a results folder holding mlflow.db"):
        nb.open_store(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    [listed] = nb.list_sweeps(tracker)
    assert {k: listed[k] for k in ("sweep", "generation", "trials", "complete", "failed")} == {
        "sweep": "tiny-report",
        "generation": 1,
        "trials": 8,
        "complete": 8,
        "failed": 0,
    }
    assert nb.pick_sweep(tracker) == "tiny-report"
    with pytest.raises(InvalidValue, match=r"sweep: 'nope'.*tiny-report"):
        nb.pick_sweep(tracker, "nope")

    rows = trial_rows(tracker, "tiny-report")
    assert len(nb.filter_rows(rows, defense="ft", attack="badnets")) == 8
    assert nb.filter_rows(rows, defense="nc") == []
    with pytest.raises(InvalidValue, match="filter: 'lr'"):
        nb.filter_rows(rows, lr=0.01)
    table = nb.cell_table(rows)
    assert list(table.columns) == list(nb.CELL_COLUMNS) and len(table) == 8

    # 4 of the 8 trials ran the default configuration (2 seeds x 2 subsets)
    assert sum(bool(r["default_config"]) for r in nb.study_rows(rows)) == 4
    # the success grid against a count by hand: a trial near chance (ACC <= 1/10 + 0.05) never
    # succeeds on digits; on a dataset of unknown classes nothing is called collapsed
    study = nb.study_rows(rows)

    def share(max_asr, max_drop, classes):
        ok = [
            r
            for r in study
            if float(r["asr"]) <= max_asr
            and float(r["before_acc"]) - float(r["acc"]) <= max_drop
            and (classes is None or float(r["acc"]) > 1 / classes + 0.05)
        ]
        return pytest.approx(100 * len(ok) / len(study))

    grid = nb.success_grid(study, max_asr=(1.0,), max_acc_drop=(1.0,))
    assert grid["success %"].tolist() == [share(1.0, 1.0, 10)]
    unknown = [dict(r, dataset="mystery") for r in study]
    assert nb.success_grid(unknown, max_asr=(0.05, 1.0), max_acc_drop=(1.0,))["success %"].tolist() == [
        share(0.05, 1.0, None),
        share(1.0, 1.0, None),
    ]
    assert share(1.0, 1.0, None) == 100.0
    with pytest.raises(InvalidValue, match="param: 'momentum'"):
        nb.sensitivity_figure(nb.study_rows(rows), "momentum")

    images = nb.trigger_images(tracker, rows[0])
    assert "trigger.png" in images and images["trigger.png"].ndim == 3

    # a trial whose ACC differs from its attacked model's, so evaluating the wrong weights shows
    row = next(r for r in rows if r["acc"] != r["before_acc"])
    loaded = nb.load_defended_model(tracker, row, tmp_path)
    assert loaded.backdoored is not None  # the defended weights, not the folder's own
    expected = build_model("mini_resnet", 10, loaded.data.image_shape[-1], loaded.data.mean, loaded.data.std)
    assert nb.param_count(loaded.model) == nb.param_count(expected) > 0
    metrics = evaluate_attacked(loaded)
    assert (metrics["acc"], metrics["asr"]) == pytest.approx((row["acc"], row["asr"]), abs=1e-9)
    with pytest.raises(InvalidValue, match="trial"):
        nb.load_defended_model(tracker, dict(row, status="failed"), tmp_path)
