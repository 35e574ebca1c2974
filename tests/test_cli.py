"""`bdlab` end to end in subprocesses: outputs of `bdlab attack`, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

BDLAB = [sys.executable, "-m", "bdlab.cli"]
TINY = ["--dataset-param", "train_subset=200", "--dataset-param", "test_subset=100"]


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([*BDLAB, *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "badnets"
    proc = run(
        "attack",
        "--dataset",
        "digits",
        "--model",
        "mini_resnet",
        "--attack",
        "badnets",
        *TINY,
        "--epochs",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
        check=True,
    )
    return out, proc


def test_attack_writes_the_folder(attacked):
    out, proc = attacked
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "trigger.png", "poison.json", "spec.yaml", "metrics.json"} <= names
    assert "[attack] epoch 2/2" in proc.stderr and "val ACC" in proc.stderr  # progress is visible


def test_spec_is_fully_resolved(attacked):
    spec = yaml.safe_load((attacked[0] / "spec.yaml").read_text())
    assert spec["seed"] == 3 and spec["model"] == "mini_resnet"
    params = spec["attack"]["params"]
    assert params["size"] == 3 and params["ratio"] == 0.1 and params["target"] == 0  # every default
    assert spec["recipe"]["epochs"] == 2 and spec["recipe"]["lr"] > 0
    assert spec["dataset"]["params"]["train_subset"] == 200
    assert spec["versions"]["torch"] == torch.__version__.split("+")[0] or spec["versions"][
        "torch"
    ].startswith("2.")
    assert "commit" in spec["git"] and spec["device"]["device"] == "cpu"
    assert spec["poisoned"] == 20


def test_metrics_json_keys_and_reproducible_evaluation(attacked):
    out = attacked[0]
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {"acc", "asr", "asr_cond", "ra", "asr_x4", "asr_x5", "asr_x9"}
    assert keys <= set(metrics) and keys <= set(metrics["val"])
    assert all(0 <= metrics[k] <= 1 for k in keys)
    poison = json.loads((out / "poison.json").read_text())
    assert poison["count"] == 20 and len(poison["index"]) == 20 and set(poison["new_labels"]) == {0}
    again = json.loads(run("evaluate", "--attacked", str(out), check=True).stdout)
    for k in keys:
        assert again[k] == pytest.approx(metrics[k]), k


def test_blended_has_null_patch_metrics(tmp_path):
    out = tmp_path / "blended"
    run(
        "attack",
        "--dataset",
        "digits",
        "--model",
        "mini_resnet",
        "--attack",
        "blended",
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(out),
        "--quiet",
        check=True,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["asr_x4"] is None and metrics["asr_x5"] is None and metrics["asr_x9"] is None


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


BASE = ["attack", "--dataset", "digits", "--model", "mini_resnet", "--attack", "badnets", "--out"]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--dataset", "mnist"], ["dataset", "'mnist'", "digits"]),
        (["--model", "resnet999"], ["model", "'resnet999'", "mini_resnet"]),
        (["--attack", "nope"], ["attack", "'nope'", "badnets"]),
        (["--param", "bogus=1"], ["param", "'bogus'", "ratio"]),
        (["--param", "ratio=1.5"], ["'ratio'", "1.5", "[0.0, 1.0]"]),
        (["--param", "size=-2"], ["'size'", "-2", "[1, 64]"]),
        (["--param", "ratio"], ["--param", "'ratio'", "key=value"]),
        (["--param", "target=12"], ["'target'", "12", "10 classes"]),
        (["--recipe", "lr=-1"], ["'lr'", "-1"]),
        (
            ["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"],
            ["--data-root", "/nonexistent/cifar", "no such folder"],
        ),
        (["--dataset", "imagefolder"], ["--data-root", "None", "imagefolder"]),
        (["--device", "tpu"], ["--device", "'tpu'", "auto, cpu"]),
        (["--recipe-preset", "gpu_fast"], ["--recipe-preset", "'gpu_fast'", "cifar_cpu"]),
        (["--recipe-preset", "cifar_cpu"], ["--recipe-preset", "'cifar_cpu'", "cifar10, imagefolder"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needles):
    argv = [*BASE, str(tmp_path / "out"), "--epochs", "1", *args]
    # later flags override earlier ones in argparse, so the bad value wins
    proc = run(*argv)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_required_flag_is_one_line(tmp_path):
    assert_one_line_error(run("attack", "--dataset", "digits"), "required")


def test_existing_results_are_not_overwritten(attacked):
    out = attacked[0]
    before = (out / "model.safetensors").read_bytes()
    proc = run(*BASE, str(out), "--epochs", "1")
    assert_one_line_error(proc, "--out", "already holds a model")
    assert (out / "model.safetensors").read_bytes() == before


def test_pickle_offered_as_model_is_refused(attacked, tmp_path):
    evil = tmp_path / "model.pt"
    torch.save({"head.weight": torch.zeros(1)}, evil)
    proc = run("evaluate", "--attacked", str(attacked[0]), "--weights", str(evil))
    assert_one_line_error(proc, "--weights", "pickle", "safetensors")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 32)
    assert_one_line_error(run("evaluate", "--attacked", str(attacked[0]), "--weights", str(raw)), "pickle")


def test_incomplete_attacked_folder(tmp_path):
    assert_one_line_error(run("evaluate", "--attacked", str(tmp_path / "none")), "--attacked", "not a folder")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "spec.yaml").write_text("kind: attack\n")
    assert_one_line_error(run("evaluate", "--attacked", str(tmp_path / "half")), "model.safetensors")


def test_import_checkpoint_is_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert run("import-checkpoint", str(good), str(tmp_path / "good.safetensors")).returncode == 0

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pt"
    torch.save({"w": Evil()}, bad)
    proc = run("import-checkpoint", str(bad), str(tmp_path / "bad.safetensors"))
    assert_one_line_error(proc, "plain tensors")
    assert "pwned" not in proc.stdout


def test_import_checkpoint_of_published_preact_resnet18(tmp_path):
    """A BackdoorBench-shaped PreActResNet18 state dict (the published names, plain tensors, trained
    behind BackdoorBench's CIFAR-10 normalization) imports into `preact_resnet18` and computes what
    the published network computes."""
    import published_preact

    from trials.files import load_weights
    from trials.models import build_model

    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    state = published_preact.random_state(10)
    foreign = tmp_path / "preactresnet18.pt"
    torch.save(state, foreign)
    out = tmp_path / "converted.safetensors"
    stats = ["--input-mean", ",".join(map(str, mean)), "--input-std", ",".join(map(str, std))]
    run("import-checkpoint", str(foreign), str(out), *stats, check=True)
    model = build_model("preact_resnet18", 10, 32, (0.5,) * 3, (0.5,) * 3).eval()  # other statistics
    model.load_state_dict(load_weights(out), strict=True)
    x = torch.rand(4, 3, 32, 32)
    z = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), published_preact.forward(state, z), rtol=1e-4, atol=1e-4)

    # without the statistics the names are kept as they are: the model's normalize buffers are missing
    run("import-checkpoint", str(foreign), str(tmp_path / "bare.safetensors"), check=True)
    assert "normalize.mean" not in load_weights(tmp_path / "bare.safetensors")
    bad = run("import-checkpoint", str(foreign), str(tmp_path / "bad.safetensors"), "--input-mean", "0,0,0")
    assert_one_line_error(bad, "--input-std")
    bad = run(
        "import-checkpoint", str(foreign), str(tmp_path / "bad.safetensors"), *stats[:2], "--input-std", "1,x"
    )
    assert_one_line_error(bad, "--input-std", "one per channel")


def test_list_prints_every_component_with_defaults():
    out = run("list", check=True).stdout
    for name in ("digits", "imagefolder", "mini_resnet", "vgg16_bn", "badnets", "wanet", "defenses:"):
        assert name in out
    assert "ratio: float = 0.1" in out
    # the sweep-wide settings come from the same typed fields the spec reader checks against
    sweep = run("list", "sweep", check=True).stdout
    assert "  sampler\n      name: str = 'tpe' {tpe, random, gp, nsga2}" in sweep
    assert "max_retries: int = 1 >= 0" in sweep
    assert "design: str = 'sobol' {sobol, grid}" in sweep and "subsets: int = 1 >= 1" in sweep
