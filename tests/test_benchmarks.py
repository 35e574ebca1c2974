"""The CPU benchmarks (benchmarks/*.py) run end to end at their smallest sizes and print or write
their figures, so a change to the platform cannot leave them broken unnoticed (sweep_overhead.py
once passed a Store where a Tracker was needed, and nothing ran it). gpu_check.py has its own test.

Each script runs in a subprocess in its own folder (tests/benchmark_scripts.py says why); the three
start together and each test waits for its own, so the module costs about the slowest of them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmark_scripts import BENCHMARKS, one_thread_env, positive

TIMEOUT_S = 600


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    tmp = tmp_path_factory.mktemp("benchmarks")
    commands = {
        "data_path": [
            "--steps", "1", "--warmup", "0", "--models", "mini_resnet", "--workers", "0",
            "--data-batches", "2", "--repeats", "1", "--rounds", "1", "--json", "data_path.json",
        ],
        "tracking": [
            "--writers", "1", "--trials", "1", "--steps", "1", "--stores", "sqlite",
            "--json", "tracking.json",
        ],
        "sweep_overhead": ["--trials", "1"],
    }  # fmt: skip
    procs = {}
    for name, args in commands.items():
        cwd = tmp / name
        cwd.mkdir()
        proc = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
            cwd=cwd,
            env=one_thread_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[name] = (proc, cwd)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(runs: dict[str, tuple[subprocess.Popen, Path]], name: str) -> tuple[str, Path]:
    """The run's stdout and its folder (where its JSON is), once it has exited cleanly."""
    proc, cwd = runs[name]
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, cwd


def test_data_path_measures_both_pipelines(runs) -> None:
    stdout, cwd = finish(runs, "data_path")
    result = json.loads((cwd / "data_path.json").read_text())
    assert {"environment", "data_path", "training", "summary"} <= set(result)
    assert positive(result["seconds"])
    assert result["data_path"] and result["training"], result
    assert "total benchmark time" in stdout


def test_tracking_records_trials_without_errors(runs) -> None:
    stdout, cwd = finish(runs, "tracking")
    (row,) = json.loads((cwd / "tracking.json").read_text())
    assert row["store"] == "sqlite" and row["writers"] == 1 and row["trials"] == 1
    assert row["errors"] == 0, row["first_error"]
    assert positive(row["trials_per_s"]) and positive(row["median_s"])
    assert "| sqlite | 1 |" in stdout


def test_sweep_overhead_prints_the_per_trial_overhead(runs) -> None:
    stdout, _ = finish(runs, "sweep_overhead")
    phases = re.search(r"sweep of 1 / 2 CLP trials: ([0-9.]+) s / ([0-9.]+) s", stdout)
    assert phases is not None, stdout
    assert all(positive(float(v)) for v in phases.groups())
    assert re.search(r"platform overhead per trial: -?[0-9.]+ s", stdout), stdout
