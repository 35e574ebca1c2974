"""benchmarks/gpu_check.py: its smoke run (every part, tiny sizes, on the CPU) writes a complete JSON,
and without CUDA the full check refuses in one line.

The script runs in a subprocess: importing it here would register its synthetic dataset in this
process, and the dataset contract tests loop over every registered dataset.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmark_scripts import BENCHMARKS, one_thread_env, positive

SCRIPT = BENCHMARKS / "gpu_check.py"
NO_CUDA = (
    "gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
    "--smoke runs every part on the CPU with tiny sizes"
)


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=one_thread_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def in_unit(value: Any) -> bool:
    return isinstance(value, int | float) and 0.0 <= value <= 1.0


def test_smoke_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = run_script(["--smoke", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bdlab GPU check" in proc.stdout and "targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    parts = result["parts"]
    assert set(parts) == {"data", "train", "dhbe", "precision", "pack"}
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part["status"])

    rates = parts["data"]["images_per_s"]
    assert "ours" in rates and any(key.startswith("conventional") for key in rates)
    assert all(positive(r) for r in rates.values()), rates
    assert positive(parts["data"]["ratio"])

    modes = parts["train"]["modes"]
    assert set(modes) == {"fp32", "bf16", "bf16_compile"}
    for key, mode in modes.items():
        assert mode["status"] == "ok", (key, mode["status"])
        assert positive(mode["images_per_s"]) and positive(mode["projected_200_epochs_s"]), (key, mode)
    assert positive(modes["bf16_compile"]["compile_s"])

    dhbe = parts["dhbe"]["modes"]
    assert set(dhbe) == {"fp32", "bf16"}
    for key, mode in dhbe.items():
        assert mode["status"] == "ok", (key, mode["status"])
        assert positive(mode["iterations_per_s"]) and positive(mode["projected_full_s"]), (key, mode)

    teacher = result["teacher"]
    assert teacher["status"] == "ok" and teacher["synthetic"] is True
    assert in_unit(teacher["acc"]) and in_unit(teacher["asr"])

    precision = parts["precision"]
    runs = precision["runs"]
    assert set(runs) == {"fp32", "bf16"}
    fp32, bf16 = runs["fp32"]["loss_curve"], runs["bf16"]["loss_curve"]
    assert len(fp32) == len(bf16) == precision["params"]["epochs"]
    assert all(math.isfinite(v) for v in fp32 + bf16)
    for key, run in runs.items():
        assert in_unit(run["acc"]) and in_unit(run["asr"]), (key, run)

    pack = parts["pack"]
    assert {"1", "2", "4"} <= set(pack["runs"])
    for key, row in pack["runs"].items():
        assert row["processes"] == int(key)
        assert positive(row["trials_per_s"]) and positive(row["images_per_s"]), (key, row)
    assert pack["ratios"]["1"] == pytest.approx(1.0)
    assert all(positive(r) for r in pack["ratios"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the full check would run")
def test_without_cuda_the_full_check_refuses(tmp_path: Path) -> None:
    proc = run_script([], tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [NO_CUDA]
    assert not (tmp_path / "gpu_check.json").exists()
