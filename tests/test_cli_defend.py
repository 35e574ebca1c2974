"""`bdlab defend` end to end in subprocesses: the folder it writes, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

BDLAB = [sys.executable, "-m", "bdlab.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BDLAB, *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bdlab: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def defended(tiny_attacked, tmp_path_factory):
    out = tmp_path_factory.mktemp("defend") / "clp"
    proc = run(
        "defend",
        "--attacked",
        str(tiny_attacked.folder),
        "--defense",
        "clp",
        "--preset",
        "cpu",
        "--param",
        "u=2.5",
        "--seed",
        "4",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_defend_writes_model_spec_and_metrics(defended, tiny_attacked):
    out, proc = defended
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "spec.yaml", "metrics.json"}
    spec = yaml.safe_load((out / "spec.yaml").read_text())
    assert spec["defense"] == {"name": "clp", "preset": "cpu", "params": {"u": 2.5, "bn_eps": False}}
    assert spec["seed"] == 4 and spec["data"]["kind"] == "none" and "versions" in spec and "git" in spec
    assert spec["attacked"]["folder"] == str(tiny_attacked.folder.resolve())
    assert spec["precision"] == {"training": "fp32", "evaluation": "fp32"}  # the CPU: float32 only
    metrics = json.loads((out / "metrics.json").read_text())
    for part in (metrics, metrics["val"], metrics["before"]):
        assert {"acc", "asr", "asr_cond", "asr_paper", "ra", "asr_x4", "asr_x5", "asr_x9"} <= set(part)
    b = metrics["before"]  # der: the defended model against the backdoored one, on each half
    assert "der" not in b and metrics["der"] == pytest.approx(
        (max(0, b["asr"] - metrics["asr"]) - max(0, b["acc"] - metrics["acc"]) + 1) / 2
    )
    assert b["asr_paper"] == b["asr_cond"] and "der" in metrics["val"]
    assert metrics["seconds"] > 0
    assert "[clp]" in proc.stderr and "val ACC" in proc.stderr  # progress is visible
    assert "ASR" in proc.stdout.splitlines()[-1]


def test_defended_model_evaluates_as_recorded(defended, tiny_attacked):
    out, _ = defended
    proc = run(
        "evaluate",
        "--attacked",
        str(tiny_attacked.folder),
        "--weights",
        str(out / "model.safetensors"),
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    recorded = json.loads((out / "metrics.json").read_text())
    assert again["acc"] == pytest.approx(recorded["acc"]) and again["asr"] == pytest.approx(recorded["asr"])
    # other weights: asr_paper still conditions on the folder's (backdoored) model, as the defense did
    assert again["asr_paper"] == pytest.approx(recorded["asr_paper"])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--defense", "nope"], ["defense", "'nope'", "bcu"]),
        (["--defense", "clp", "--param", "u=-1"], ["'u'", "-1"]),
        (["--defense", "clp", "--param", "data_count=5"], ["'data_count'", "u"]),  # clp takes no data
        (["--defense", "clp", "--preset", "gpu9"], ["--preset", "'gpu9'", "cpu"]),
        (["--defense", "bcu", "--param", "data_count=100000"], ["data_count", "100000", "at most"]),
    ],
)
def test_bad_input_is_one_line(tiny_attacked, tmp_path, args, needles):
    proc = run("defend", "--attacked", str(tiny_attacked.folder), "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_or_incomplete_attacked_folder(tmp_path):
    proc = run(
        "defend", "--attacked", str(tmp_path / "none"), "--defense", "clp", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "--attacked", "not a folder")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "spec.yaml").write_text("kind: attack\n")
    proc = run(
        "defend", "--attacked", str(tmp_path / "half"), "--defense", "clp", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(proc, "model.safetensors")


def test_pickled_model_in_attacked_folder_is_refused(tiny_attacked, tmp_path):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(tiny_attacked.folder, folder)
    torch.save(
        tiny_attacked.model.state_dict(), folder / "model.safetensors"
    )  # a pickle under the right name
    proc = run("defend", "--attacked", str(folder), "--defense", "clp", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "pickle", "safetensors")


def test_poisoned_set_missing_is_explained_for_pbe(tiny_attacked, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(tiny_attacked.folder, folder)
    (folder / "poisoned_images.safetensors").unlink()
    proc = run("defend", "--attacked", str(folder), "--defense", "pbe", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "poisoned_images.safetensors", "re-run `bdlab attack`")
