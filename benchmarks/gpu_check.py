"""GPU check: the performance figures of a sweep on one CUDA GPU, in one command sized for 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py                         # on a machine with one CUDA GPU
    .venv/bin/python benchmarks/gpu_check.py --data-root DIR         # the teacher on CIFAR-10 (see below)
    .venv/bin/python benchmarks/gpu_check.py --parts train,dhbe      # a subset of the parts
    .venv/bin/python benchmarks/gpu_check.py --smoke                 # every part, tiny sizes, on the CPU

It prints a table (targets beside the figures, as pass/fail) and writes the same as JSON (`--json`,
default gpu_check.json in the current folder). The parts:

- `data`: the data path alone, ours against the conventional PIL/torchvision DataLoader pipeline, in
  images/s: part (a) of `benchmarks/data_path.py` (its `run_bench`, without its training part), on
  50,000 random CIFAR-sized images, batch 128, the conventional pipeline with 0 and 8 workers.
- `train`: ResNet-18 training images/s on CIFAR-10-shaped batches (random 32x32x3 uint8 images, 10
  classes, batch 128), through `trials.training.train_classifier`, the loop every attack trains with
  (index into the resident tensor, crop + flip on the device, SGD), in three modes: fp32 (TF32
  allowed), bf16 autocast + channels_last (what attacks run), and the same under `torch.compile`.
  Each mode first runs untimed warm-up steps (for torch.compile: its compilation, reported as
  `compile_s`), then the timed steps, clocked after `torch.cuda.synchronize`. Projected: 200 epochs
  of 50,000 images (the paper's recipe) at the measured rate.
- `dhbe`: DHBE iterations/s at the official code's sizes (trials/defenses/dhbe.py's defaults:
  resnet18 student and teacher, CIFAR-10 shapes, batch 256, 5 student steps, generators of width 64),
  in fp32 (what DHBE declares, `precision = "fp32"`) and under bf16 autocast (`DefenseSpec.amp`), the
  defense's own `run` on a random-weight resnet18; the first epoch is warm-up, the clock reads the
  per-epoch progress reports (each follows a device sync). Projected: the published schedule, 300
  epochs x 50 iterations.
- `precision`: DHBE in both precisions, same seed, a short schedule (30 epochs x 10 iterations at
  the same sizes), through `trials.run.run_defense` on a backdoored teacher: both per-epoch loss
  curves (from the progress hook) and the final report-half ACC/ASR of each.
- `pack`: 1, 2, 3 and 4 FT trials (resnet18, the DHBE protocol's fine-tuning, 5 epochs) at once on
  the GPU, each in its own process (spawned, as Ray's fractional GPUs run them), each calling
  `run_defense` like a sweep's worker; aggregate trials/s and fine-tuning images/s against one trial.

The backdoored teacher of `precision` and `pack` is trained first through `trials.run.run_attack`
(BadNets 5x5 checkerboard, target 0, 10 %; resnet18, 10 epochs, cosine schedule, no random crop: a
shifted patch is not learnt within a short schedule, as the `cifar_cpu` recipe preset in
trials/recipe_presets.yaml measured), saved as an attacked-model folder and loaded back as every
defense trial does. Its data: CIFAR-10 with
`--data-root` (torchvision's cifar-10-batches-py folder, or an imagefolder train/ + test/ tree), else
a synthetic but learnable set made here (`PatternDataset`: oriented, coloured gratings whose class is
the orientation, with overlapping neighbours, so that ACC is a real figure below 100 %). The table
says which was used.

`--smoke` runs every part on the CPU with tiny sizes (mini_resnet, a few steps, batch 8-32, packing
1, 2 and 4 processes; the compiled mode with torch.compile's `eager` backend, graph capture only,
since inductor's C++ compilation alone takes minutes on a CPU), in under a minute on 2 cores: it
checks the code paths, and its figures say nothing about a GPU (on the CPU every mode runs float32:
bf16 autocast is CUDA-only, `trials.device.use_amp`). `--smoke --device cuda` runs the same tiny
sizes on a GPU, a quick check of the CUDA code paths before the full run. Without `--smoke` and without CUDA the script exits
with status 2. A mode or part that cannot run (torch.compile without a compiler, an out-of-memory)
is reported as "failed: <reason>" and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trials.data.base import Dataset, RawImages
from trials.data.registry import register_dataset
from trials.defenses import DefenseContext, DefenseData
from trials.device import allow_tf32, make_generator, precision_name, prepare_model
from trials.models import build_model
from trials.params import param
from trials.run import (
    AttackSpec,
    DefenseSpec,
    load_attacked,
    resolve_defense,
    run_attack,
    run_defense,
    save_attack_result,
    training_amp,
)
from trials.training import TrainRecipe, train_classifier

NO_CUDA = (
    "gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
    "--smoke runs every part on the CPU with tiny sizes"
)
PARTS = ("data", "train", "dhbe", "precision", "pack")
BUDGET_S = 8 * 60  # the whole check on one GPU; each part's sizes below are chosen to fit it

# Targets on an H100/H200-class GPU (the performance issue).
TARGET_TRAIN_S = 120.0  # ResNet-18 CIFAR-10, 200 epochs, best mode
TARGET_DHBE_S = 600.0  # DHBE's published schedule, 300 x 50 iterations
TARGET_PACK_RATIO = 2.0  # 3 packed trials: aggregate throughput against one
PACK_TARGET_COUNT = 3

CIFAR_TRAIN_IMAGES, RECIPE_EPOCHS = 50_000, 200  # the paper's recipe, for the projection
DHBE_EPOCHS, DHBE_ITERS = 300, 50  # the published schedule (DHBEParams' defaults)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
TEACHER_ATTACK = {"pattern": "checkerboard", "size": 5, "target": 0, "ratio": 0.1}

Say = Callable[[str], None]


# --- sizes: the full check on a GPU, and the smoke run on a CPU -------------------------------------
@dataclass(frozen=True)
class Sizes:
    model: str
    # data: images, batch, batches per timed run, runs (median), conventional DataLoader workers
    data_images: int
    data_batch: int
    data_batches: int
    data_repeats: int
    data_workers: tuple[int, ...]
    # train: batch, untimed warm-up steps, timed steps, torch.compile's backend
    train_batch: int
    train_warmup: int
    train_steps: int
    compile_backend: str
    # dhbe: parameters on top of the defaults; the first of `epochs` epochs is warm-up
    dhbe_params: dict[str, Any]
    # the teacher: PatternDataset's sizes (or dataset params of --data-root's), recipe overrides
    teacher_data: dict[str, Any]
    cifar_data: dict[str, Any]
    teacher_recipe: dict[str, Any]
    # precision: DHBE's short schedule, on top of the defaults
    precision_params: dict[str, Any]
    # pack: FT's parameters, trial processes at once, timed trials per process
    pack_params: dict[str, Any]
    pack_counts: tuple[int, ...]
    pack_trials: int


# Full sizes, each part's timing estimated for an H100 (ResNet-18 about 10-20k training images/s in
# bf16, a DHBE iteration 50-100 ms): data ~15 s, train ~2 min (torch.compile's compile most of it),
# dhbe ~15 s, teacher ~40 s, precision ~1 min, pack ~1.5 min (4 processes starting once).
FULL = Sizes(
    model="resnet18",
    data_images=50_000,
    data_batch=128,
    data_batches=40,
    data_repeats=3,
    data_workers=(0, 8),
    train_batch=128,
    train_warmup=10,
    train_steps=100,
    compile_backend="inductor",
    dhbe_params={"epochs": 4, "iters_per_epoch": 10},
    teacher_data={"train_size": 25_000, "test_size": 5_000},
    cifar_data={},
    teacher_recipe={"epochs": 10, "schedule": "cosine", "lr": 0.1, "batch_size": 128, "crop_pad": 0},
    precision_params={"epochs": 30, "iters_per_epoch": 10},
    pack_params={"epochs": 5},
    pack_counts=(1, 2, 3, 4),
    pack_trials=2,
)

TINY_DHBE = {
    "batch_size": 8,
    "student_steps": 2,
    "generator_width": 8,
    "patch_generator_width": 8,
    "nz": 16,
    "nz_patch": 16,
}
SMOKE = Sizes(
    model="mini_resnet",
    data_images=512,
    data_batch=32,
    data_batches=4,
    data_repeats=1,
    data_workers=(0,),
    train_batch=16,
    train_warmup=1,
    train_steps=3,
    compile_backend="eager",
    dhbe_params={**TINY_DHBE, "epochs": 3, "iters_per_epoch": 2},
    teacher_data={"train_size": 400, "test_size": 100},
    cifar_data={"train_subset": 400, "test_subset": 100},
    teacher_recipe={"epochs": 2, "schedule": "cosine", "lr": 0.05, "batch_size": 32, "crop_pad": 0},
    precision_params={**TINY_DHBE, "epochs": 3, "iters_per_epoch": 2},
    pack_params={"epochs": 1, "min_epoch_size": 16, "batch_size": 8},
    pack_counts=(1, 2, 4),
    pack_trials=1,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:240]


def _free(device: torch.device) -> None:
    """Give the GPU memory of a finished part back before the next (packed trials need it)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the teacher's synthetic data: learnable, not trivially --------------------------------------
@dataclass(frozen=True)
class PatternParams:
    train_size: int = param(25_000, "training split images", low=10)
    test_size: int = param(5_000, "test split images", low=10)
    seed: int = param(0, "seed of the images")


# Class c is a grating at orientation c x 18 degrees, drawn within +-12 degrees of it, so that
# neighbouring orientations overlap (a quarter of the images lie nearer a neighbour's); its colour is
# the palette's entry c // 2, which tells apart every neighbour pair but (2k, 2k + 1). So the best
# achievable accuracy is about 94 %, not 100 % (mini_resnet, 4 epochs on 2,700 of them, CPU: ACC 0.87,
# and with the teacher's attack ASR 1.00). Frequency, phase, contrast, brightness and pixel noise vary
# per image. A flip mirrors the orientation: the set declares no flip.
PALETTE = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.2), (0.2, 0.3, 0.9), (0.9, 0.8, 0.1), (0.8, 0.2, 0.8))
ORIENTATION_STEP, ORIENTATION_JITTER = math.pi / 10, math.radians(12)


def pattern_images(labels: torch.Tensor, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """uint8 N,3,size,size gratings of the given classes (see PALETTE)."""
    n = len(labels)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    theta = labels.float() * ORIENTATION_STEP + uniform(-ORIENTATION_JITTER, ORIENTATION_JITTER)
    cycles, phase = uniform(2.0, 4.0), uniform(0.0, 2 * math.pi)
    grid = torch.arange(size, dtype=torch.float32) / size
    cos, sin = theta.cos().view(n, 1, 1), theta.sin().view(n, 1, 1)
    along = grid.view(1, 1, size) * cos + grid.view(1, size, 1) * sin  # position along the wave: N,H,W
    wave = torch.sin(2 * math.pi * cycles.view(n, 1, 1) * along + phase.view(n, 1, 1))  # N,H,W
    colour = torch.tensor(PALETTE)[labels // 2] + 0.1 * torch.randn(n, 3, generator=generator)
    contrast, brightness = uniform(0.5, 0.9), uniform(-0.1, 0.1)
    image = 0.5 + 0.5 * contrast.view(n, 1, 1, 1) * wave[:, None] * (2 * colour - 1).view(n, 3, 1, 1)
    image = image + brightness.view(n, 1, 1, 1) + 0.06 * torch.randn(n, 3, size, size, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


@register_dataset("gpu_check_patterns")
class PatternDataset(Dataset):
    """Oriented coloured gratings, 10 classes, 32x32 (see PALETTE): the teacher's data without CIFAR-10."""

    Params = PatternParams
    flip = False
    needs_root = False

    def load_raw(self) -> RawImages:
        p: PatternParams = self.params
        gen = torch.Generator().manual_seed(p.seed)
        train_y = torch.arange(p.train_size) % 10
        test_y = torch.arange(p.test_size) % 10
        return RawImages(
            train_x=pattern_images(train_y, gen).numpy(),
            train_y=train_y.numpy(),
            test_x=pattern_images(test_y, gen).numpy(),
            test_y=test_y.numpy(),
            class_names=[f"orientation_{c}" for c in range(10)],
        )


def teacher_dataset(data_root: str | None, sizes: Sizes) -> tuple[str, dict[str, Any], str]:
    """(dataset name, its params, what to call it in the report) for the teacher."""
    if data_root is None:
        n, t = sizes.teacher_data["train_size"], sizes.teacher_data["test_size"]
        return "gpu_check_patterns", dict(sizes.teacher_data), f"synthetic gratings ({n:,} train, {t:,} test)"
    root = Path(data_root)
    if (root / "cifar-10-batches-py").is_dir():
        name = "cifar10"
    elif (root / "train").is_dir() and (root / "test").is_dir():
        name = "imagefolder"
    else:
        raise ValueError(
            f"--data-root {data_root!r}: expected cifar-10-batches-py/ or an imagefolder train/ + test/ tree"
        )
    subset = " (subset)" if sizes.cifar_data else ""
    return name, dict(sizes.cifar_data), f"{name} from {data_root}{subset}"


# --- the machine ---------------------------------------------------------------------------------
def machine(device: torch.device) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {
        "device": str(device),
        "gpu": None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# --- (1) the data path alone ---------------------------------------------------------------------
def data_path_module() -> types.ModuleType:
    """benchmarks/data_path.py, imported by its path (benchmarks/ is not a package)."""
    if "data_path" not in sys.modules:
        spec = importlib.util.spec_from_file_location("data_path", Path(__file__).with_name("data_path.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["data_path"] = module  # its dataclasses look their module up while being made
        spec.loader.exec_module(module)
    return sys.modules["data_path"]


def part_data(sizes: Sizes, device: torch.device, seed: int, say: Say) -> dict[str, Any]:
    bench = data_path_module().run_bench(
        synthetic=sizes.data_images,
        batch_size=sizes.data_batch,
        models=(),
        device=str(device),
        workers=sizes.data_workers,
        data_batches=sizes.data_batches,
        repeats=sizes.data_repeats,
        seed=seed,
        progress=lambda msg: say(f"data: {msg}"),
    )
    rates = {key: row["images_per_s"] for key, row in bench["data_path"].items()}
    ours = bench["summary"]["data_path"]["ours"]
    return {
        "images": sizes.data_images,
        "batch_size": sizes.data_batch,
        "labels": bench["labels"],
        "images_per_s": rates,
        "ratio": ours["ratio"],
        "vs": ours["vs"],
        "target_ratio": ours["target"],
        "bench": bench,
    }


# --- (2) ResNet-18 training in three modes -------------------------------------------------------
@dataclass(frozen=True)
class TrainMode:
    key: str
    label: str
    amp: bool
    compiled: bool


TRAIN_MODES = (
    TrainMode("fp32", "fp32 (TF32 allowed)", amp=False, compiled=False),
    TrainMode("bf16", "bf16 autocast + channels_last", amp=True, compiled=False),
    TrainMode("bf16_compile", "bf16 + channels_last + torch.compile", amp=True, compiled=True),
)


def time_training(mode: TrainMode, sizes: Sizes, device: torch.device, seed: int) -> dict[str, Any]:
    """Warm-up steps, then timed steps, each a `train_classifier` call of one epoch over exactly that
    many batches (so every batch has the same shape: no recompilation)."""
    amp = mode.amp and device.type == "cuda"  # as trials.device.use_amp: never on the CPU
    allow_tf32(device)
    torch.manual_seed(seed)
    model = prepare_model(build_model(sizes.model, 10, 32, CIFAR_MEAN, CIFAR_STD), device, amp)
    net = torch.compile(model, backend=sizes.compile_backend) if mode.compiled else model
    gen = make_generator(device, seed)
    batch = sizes.train_batch
    steps = sizes.train_warmup + sizes.train_steps
    images = torch.randint(
        0, 256, (steps * batch, 3, 32, 32), dtype=torch.uint8, generator=gen, device=device
    )
    labels = torch.randint(0, 10, (steps * batch,), generator=gen, device=device)
    # the paper's recipe at a constant rate: the schedule does not change the cost of a step
    recipe = TrainRecipe(epochs=1, batch_size=batch, schedule="constant")

    def run(lo: int, hi: int) -> float:
        _sync(device)
        start = time.perf_counter()
        train_classifier(
            net,
            images[lo * batch : hi * batch],
            labels[lo * batch : hi * batch],
            recipe,
            generator=gen,
            amp=amp,
        )
        _sync(device)
        return time.perf_counter() - start

    warm_s = run(0, sizes.train_warmup)
    seconds = run(sizes.train_warmup, steps)
    rate = sizes.train_steps * batch / seconds
    out = {
        "status": "ok",
        "precision": precision_name(device, amp),
        "compiled": mode.compiled,
        "warmup_steps": sizes.train_warmup,
        "steps": sizes.train_steps,
        "warmup_s": warm_s,
        "ms_per_step": 1e3 * seconds / sizes.train_steps,
        "images_per_s": rate,
        "projected_200_epochs_s": RECIPE_EPOCHS * CIFAR_TRAIN_IMAGES / rate,
    }
    if mode.compiled:
        out["compile_s"] = warm_s  # the warm-up steps, compilation included
        out["compile_backend"] = sizes.compile_backend
    return out


def part_train(sizes: Sizes, device: torch.device, seed: int, say: Say) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    for mode in TRAIN_MODES:
        say(f"train: {sizes.model}, {mode.label} ({sizes.train_warmup} + {sizes.train_steps} steps)")
        try:
            modes[mode.key] = time_training(mode, sizes, device, seed)
        except Exception as err:  # e.g. torch.compile without a C compiler, an out-of-memory
            modes[mode.key] = {"status": f"failed: {_one_line(err)}"}
        finally:
            if mode.compiled:
                torch._dynamo.reset()
            _free(device)
    ok = {k: m for k, m in modes.items() if m["status"] == "ok"}
    best = min(ok, key=lambda k: ok[k]["projected_200_epochs_s"]) if ok else None
    return {
        "model": sizes.model,
        "batch_size": sizes.train_batch,
        "labels": {m.key: m.label for m in TRAIN_MODES},
        "modes": modes,
        "best": best,
    }


# --- (3) DHBE iterations/s in both precisions -----------------------------------------------------
def time_dhbe(
    params: dict[str, Any], amp_request: bool | None, sizes: Sizes, device: torch.device, seed: int
) -> dict[str, Any]:
    """The defense's own `run` on a random-weight model (speed does not depend on the weights); the
    clock reads the per-epoch reports, which follow a device sync (the losses are read to the host)."""
    defense = resolve_defense(DefenseSpec("dhbe", params=params))
    amp = training_amp(defense, device, amp_request)
    allow_tf32(device)
    torch.manual_seed(seed)
    model = prepare_model(build_model(sizes.model, 10, 32, CIFAR_MEAN, CIFAR_STD), device, amp)
    stamps: list[float] = []
    ctx = DefenseContext(
        device=device,
        seed=seed,
        generator=make_generator(device, seed),
        amp=amp,
        progress=lambda _record: stamps.append(time.perf_counter()),
    )
    data = DefenseData("none", None, None, "none", num_classes=10, image_shape=(3, 32, 32), flip=True)
    defense.run(model, data, ctx)
    p = defense.params
    iterations = (p.epochs - 1) * p.iters_per_epoch  # the first epoch is the warm-up
    rate = iterations / (stamps[-1] - stamps[0])
    return {
        "status": "ok",
        "precision": precision_name(device, amp),
        "timed_iterations": iterations,
        "warmup_iterations": p.iters_per_epoch,
        "iterations_per_s": rate,
        "projected_full_s": DHBE_EPOCHS * DHBE_ITERS / rate,
    }


def part_dhbe(sizes: Sizes, device: torch.device, seed: int, say: Say) -> dict[str, Any]:
    params = dict(sizes.dhbe_params)
    resolved = dataclasses.asdict(resolve_defense(DefenseSpec("dhbe", params=params)).params)
    modes: dict[str, Any] = {}
    for key, amp in (("fp32", None), ("bf16", True)):
        say(
            f"dhbe: {sizes.model}, {key} ({params['epochs']} epochs x {params['iters_per_epoch']} iterations)"
        )
        try:
            modes[key] = time_dhbe(params, amp, sizes, device, seed)
        except Exception as err:
            modes[key] = {"status": f"failed: {_one_line(err)}"}
        finally:
            _free(device)
    return {"model": sizes.model, "params": resolved, "modes": modes}


# --- the backdoored teacher (precision, pack) ------------------------------------------------------
def train_teacher(
    sizes: Sizes, device: torch.device, data_root: str | None, seed: int, folder: Path, say: Say
) -> dict[str, Any]:
    name, params, described = teacher_dataset(data_root, sizes)
    say(f"teacher: BadNets {sizes.model} on {described}, {sizes.teacher_recipe['epochs']} epochs")
    spec = AttackSpec(
        dataset=name,
        model=sizes.model,
        attack="badnets",
        attack_params=dict(TEACHER_ATTACK),
        dataset_params=params,
        data_root=data_root,
        seed=seed,
        recipe=dict(sizes.teacher_recipe),
        device=str(device),
    )
    result = run_attack(spec)
    save_attack_result(result, folder)
    return {
        "data": described,
        "dataset": name,
        "synthetic": data_root is None,
        "model": sizes.model,
        "attack": {"name": "badnets", **TEACHER_ATTACK},
        "recipe": dict(sizes.teacher_recipe),
        "train_images": int(len(result.data.train_y)),
        "acc": result.metrics["acc"],
        "asr": result.metrics["asr"],
        "seconds": result.metrics["seconds"],
        "precision": result.spec["precision"]["training"],
    }


# --- (4) DHBE's precision comparison --------------------------------------------------------------
CURVES = ("loss_S", "L_kd", "L_br", "loss_G", "loss_Gp")


def part_precision(sizes: Sizes, folder: Path, device: torch.device, seed: int, say: Say) -> dict[str, Any]:
    attacked = load_attacked(folder, str(device))
    params = dict(sizes.precision_params)
    runs: dict[str, Any] = {}
    for key, amp in (("fp32", False), ("bf16", True)):
        say(
            f"precision: DHBE {key}, seed {seed}, {params['epochs']} x {params['iters_per_epoch']} iterations"
        )
        records: list[dict[str, Any]] = []
        try:
            result = run_defense(
                DefenseSpec("dhbe", params=params, seed=seed, amp=amp), attacked, progress=records.append
            )
        except Exception as err:
            runs[key] = {"status": f"failed: {_one_line(err)}"}
            continue
        finally:
            _free(device)
        epochs = [r for r in records if "loss_S" in r]
        runs[key] = {
            "status": "ok",
            "precision": result.spec["precision"]["training"],
            "loss_curve": [r["loss_S"] for r in epochs],
            "curves": {name: [r[name] for r in epochs] for name in CURVES},
            "val": [{k: r[k] for k in ("epoch", "val_acc", "val_asr")} for r in epochs if "val_acc" in r],
            "acc": result.metrics["acc"],
            "asr": result.metrics["asr"],
            "seconds": result.metrics["seconds"],
        }
    before = attacked.metrics  # the teacher's, as its attack measured them
    out: dict[str, Any] = {
        "seed": seed,
        "params": params,
        "teacher": {"acc": before.get("acc"), "asr": before.get("asr")},
        "runs": runs,
    }
    a, b = runs.get("fp32", {}), runs.get("bf16", {})
    if a.get("status") == b.get("status") == "ok":
        out["max_abs_loss_diff"] = max(
            abs(x - y) for x, y in zip(a["loss_curve"], b["loss_curve"], strict=True)
        )
        out["final_loss_rel_diff"] = abs(a["loss_curve"][-1] - b["loss_curve"][-1]) / max(
            abs(a["loss_curve"][-1]), 1e-12
        )
    return out


# --- (5) packed trials ----------------------------------------------------------------------------
def _pack_worker(
    folder: str,
    device: str,
    params: dict[str, Any],
    seed: int,
    threads: int | None,
    commands: Any,
    results: Any,
) -> None:
    """One trial process, as a sweep's Ray worker: loads the attacked model once, runs one untimed
    trial (CUDA context, cuDNN's algorithm choices, the allocator's pools), then per command
    `n` timed `run_defense` calls; None ends it."""
    try:
        if threads:
            torch.set_num_threads(threads)
        attacked = load_attacked(folder, device)
        spec = DefenseSpec("ft", params=params, seed=seed)
        run_defense(spec, attacked)
        results.put(("ready", os.getpid(), None))
        while (n := commands.get()) is not None:
            images = 0
            start = time.time()
            for _ in range(n):
                result = run_defense(spec, attacked)
                per_epoch = result.metrics["findings"]["samples_per_epoch"]
                images += per_epoch * result.spec["defense"]["params"]["epochs"]
            results.put(
                ("done", os.getpid(), {"start": start, "end": time.time(), "trials": n, "images": images})
            )
    except Exception as err:  # reported to the parent, which reports the part as failed
        results.put(("error", os.getpid(), _one_line(err)))


def _collect(results: Any, count: int, kind: str, procs: Sequence[Any], timeout_s: float) -> list[Any]:
    """`count` messages of `kind` from the workers; a worker's error or death, or the timeout, raises."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        try:
            what, pid, payload = results.get(timeout=2.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"trial process {dead[0].pid} died (exit code {dead[0].exitcode})"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{count - len(got)} trial process(es) not {kind} after {timeout_s:.0f} s"
                ) from None
            continue
        if what == "error":
            raise RuntimeError(f"trial process {pid}: {payload}")
        got.append(payload)
    return got


@contextlib.contextmanager
def trial_processes(
    n: int, folder: Path, device: torch.device, params: dict[str, Any], seed: int, threads: int | None
) -> Iterator[tuple[list[Any], Any, list[Any]]]:
    """`n` spawned trial processes (spawn: the parent holds a CUDA context, which fork cannot share)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    commands = [ctx.Queue() for _ in range(n)]
    procs = [
        ctx.Process(
            target=_pack_worker,
            args=(str(folder), str(device), params, seed + i, threads, commands[i], results),
            daemon=True,
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    try:
        yield commands, results, procs
    finally:
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def part_pack(sizes: Sizes, folder: Path, device: torch.device, seed: int, say: Say) -> dict[str, Any]:
    workers = max(sizes.pack_counts)
    params = dict(sizes.pack_params)
    # on a CPU (the smoke run) each trial gets one thread, as a sweep's 1-CPU trial
    threads = 1 if device.type == "cpu" else None
    say(f"pack: starting {workers} FT trial processes (each loads the teacher and runs one untimed trial)")
    runs: dict[str, Any] = {}
    with trial_processes(workers, folder, device, params, seed, threads) as (commands, results, procs):
        _collect(results, workers, "ready", procs, timeout_s=600)
        for k in sizes.pack_counts:
            say(f"pack: {k} trial process(es) at once, {sizes.pack_trials} trial(s) each")
            for q in commands[:k]:
                q.put(sizes.pack_trials)
            done = _collect(results, k, "done", procs, timeout_s=600)
            wall = max(d["end"] for d in done) - min(d["start"] for d in done)
            trials = sum(d["trials"] for d in done)
            runs[str(k)] = {
                "processes": k,
                "trials": trials,
                "wall_s": wall,
                "trials_per_s": trials / wall,
                "images_per_s": sum(d["images"] for d in done) / wall,
                "seconds_per_trial": statistics.mean((d["end"] - d["start"]) / d["trials"] for d in done),
            }
    one = runs[str(min(sizes.pack_counts))]["trials_per_s"]
    ratios = {k: r["trials_per_s"] / one for k, r in runs.items()}
    return {"defense": "ft", "model": sizes.model, "params": params, "runs": runs, "ratios": ratios}


# --- the whole check ------------------------------------------------------------------------------
@dataclass
class Check:
    sizes: Sizes
    device: torch.device
    parts: tuple[str, ...]
    data_root: str | None
    seed: int
    smoke: bool


def run_check(check: Check, say: Say) -> dict[str, Any]:
    started = time.perf_counter()
    sizes, dev, seed = check.sizes, check.device, check.seed
    out: dict[str, Any] = {
        "smoke": check.smoke,
        "machine": machine(dev),
        "parts_run": list(check.parts),
        "parts": {},
    }

    def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            part = {"status": "ok", **fn()}
        except Exception as err:
            part = {"status": f"failed: {_one_line(err)}"}
        part["seconds"] = time.perf_counter() - t0
        _free(dev)
        return part

    simple = {"data": part_data, "train": part_train, "dhbe": part_dhbe}
    for name in ("data", "train", "dhbe"):
        if name in check.parts:
            out["parts"][name] = timed(lambda fn=simple[name]: fn(sizes, dev, seed, say))
    if {"precision", "pack"} & set(check.parts):
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            folder = Path(tmp) / "teacher"
            out["teacher"] = timed(lambda: train_teacher(sizes, dev, check.data_root, seed, folder, say))
            for name, fn in (("precision", part_precision), ("pack", part_pack)):
                if name not in check.parts:
                    continue
                if out["teacher"]["status"] != "ok":
                    out["parts"][name] = {"status": "failed: no teacher (see teacher)", "seconds": 0.0}
                    continue
                out["parts"][name] = timed(lambda fn=fn: fn(sizes, folder, dev, seed, say))
    out["targets"] = targets(out)
    out["seconds"] = time.perf_counter() - started
    return out


def _target(name: str, measured: float, target: float, unit: str, at_most: bool, note: str) -> dict[str, Any]:
    met = measured <= target if at_most else measured >= target
    return {
        "name": name,
        "measured": measured,
        "target": target,
        "unit": unit,
        "at_most": at_most,
        "note": note,
        "met": met,
    }


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets for an H100/H200-class GPU against what was measured; a part that did not run or
    failed has no row."""
    parts, rows = out["parts"], []
    data = parts.get("data", {})
    if data.get("status") == "ok":
        rows.append(
            _target(
                "data path alone, ours / best conventional",
                data["ratio"],
                data["target_ratio"],
                "x",
                False,
                data["labels"][data["vs"]],
            )
        )
    train = parts.get("train", {})
    if train.get("status") == "ok" and train.get("best"):
        best = train["modes"][train["best"]]
        rows.append(
            _target(
                "ResNet-18 CIFAR-10, 200 epochs (best mode)",
                best["projected_200_epochs_s"],
                TARGET_TRAIN_S,
                "s",
                True,
                train["labels"][train["best"]],
            )
        )
    for key, mode in parts.get("dhbe", {}).get("modes", {}).items():
        if mode["status"] == "ok":
            declared = " (as declared)" if key == "fp32" else ""
            rows.append(
                _target(
                    f"DHBE published schedule, {key}{declared}",
                    mode["projected_full_s"],
                    TARGET_DHBE_S,
                    "s",
                    True,
                    mode["precision"],
                )
            )
    pack = parts.get("pack", {})
    if pack.get("status") == "ok" and str(PACK_TARGET_COUNT) in pack["ratios"]:
        rows.append(
            _target(
                f"{PACK_TARGET_COUNT} packed trials / one, aggregate throughput",
                pack["ratios"][str(PACK_TARGET_COUNT)],
                TARGET_PACK_RATIO,
                "x",
                False,
                "trials/s",
            )
        )
    return rows


# --- the report -----------------------------------------------------------------------------------
def _verdict(met: bool, smoke: bool) -> str:
    word = "pass" if met else "FAIL"
    return f"{word} (smoke: no verdict)" if smoke else word


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _failed(part: dict[str, Any]) -> str | None:
    return None if part.get("status") == "ok" else part.get("status")


def format_report(out: dict[str, Any]) -> str:
    m, parts, smoke = out["machine"], out["parts"], out["smoke"]
    lines = [
        "bdlab GPU check"
        + (" -- SMOKE RUN: tiny sizes, the figures say nothing about the targets" if smoke else "")
    ]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m["gpu"] else "none (CPU run)"
    lines.append(f"GPU: {gpu}; device {m['device']}")
    lines.append(
        f"torch {m['torch']} (CUDA {m['cuda'] or '-'}, cuDNN {m['cudnn'] or '-'}), torchvision {m['torchvision']}, "
        f"Python {m['python']}; CPUs {m['cpu_count']} (usable {m['cpu_usable']}), torch threads {m['torch_threads']}"
    )
    lines.append(f"parts: {', '.join(out['parts_run'])}")
    lines.append("")

    if "data" in parts:
        p = parts["data"]
        lines.append(f"(1) data path alone (benchmarks/data_path.py part (a)), {_duration(p['seconds'])}")
        if _failed(p):
            lines.append(f"    {_failed(p)}")
        else:
            lines.append(
                f"    {p['images']:,} random CIFAR-sized images, batch {p['batch_size']}; median images/s"
            )
            for key, rate in p["images_per_s"].items():
                lines.append(f"    {p['labels'][key]:<40}{rate:>14,.0f}")
            lines.append(f"    => ours / best conventional ({p['labels'][p['vs']]}): {p['ratio']:.1f}x")
        lines.append("")

    if "train" in parts:
        p = parts["train"]
        lines.append(f"(2) training, trials.training.train_classifier, {_duration(p['seconds'])}")
        if _failed(p):
            lines.append(f"    {_failed(p)}")
        else:
            lines.append(
                f"    {p['model']}, random CIFAR-10-shaped data, batch {p['batch_size']}, crop+flip on the device, SGD"
            )
            lines.append(
                f"    {'mode':<38}{'ran as':<15}{'images/s':>10}{'ms/step':>9}{'200 x 50k images':>18}{'compile':>10}"
            )
            for key, row in p["modes"].items():
                label = p["labels"][key]
                if row["status"] != "ok":
                    lines.append(f"    {label:<38}{row['status']}")
                    continue
                compile_s = f"{row['compile_s']:.0f} s" if "compile_s" in row else ""
                lines.append(
                    f"    {label:<38}{row['precision']:<15}{row['images_per_s']:>10,.0f}{row['ms_per_step']:>9.1f}"
                    f"{_duration(row['projected_200_epochs_s']):>18}{compile_s:>10}"
                )
        lines.append("")

    if "dhbe" in parts:
        p = parts["dhbe"]
        lines.append(f"(3) DHBE iterations/s, the defense's own run, {_duration(p['seconds'])}")
        if _failed(p):
            lines.append(f"    {_failed(p)}")
        else:
            q = p["params"]
            lines.append(
                f"    {p['model']} teacher/student, batch {q['batch_size']}, {q['student_steps']} student steps, "
                f"generator widths {q['generator_width']}/{q['patch_generator_width']}"
            )
            lines.append(f"    {'precision':<38}{'ran as':<15}{'iter/s':>10}{'300 x 50 iterations':>21}")
            for key, row in p["modes"].items():
                if row["status"] != "ok":
                    lines.append(f"    {key:<38}{row['status']}")
                    continue
                lines.append(
                    f"    {key:<38}{row['precision']:<15}{row['iterations_per_s']:>10.2f}"
                    f"{_duration(row['projected_full_s']):>21}"
                )
        lines.append("")

    if "teacher" in out:
        t = out["teacher"]
        lines.append(f"backdoored teacher (precision, pack), {_duration(t['seconds'])}")
        if _failed(t):
            lines.append(f"    {_failed(t)}")
        else:
            lines.append(
                f"    BadNets {t['attack']['size']}x{t['attack']['size']} {t['attack']['pattern']} on {t['data']}, "
                f"{t['model']}, {t['recipe']['epochs']} epochs ({t['precision']}): ACC {t['acc']:.3f}, ASR {t['asr']:.3f}"
            )
        lines.append("")

    if "precision" in parts:
        p = parts["precision"]
        lines.append(f"(4) DHBE precision comparison, same seed, {_duration(p['seconds'])}")
        if _failed(p):
            lines.append(f"    {_failed(p)}")
        else:
            q = p["params"]
            runs = p["runs"]
            lines.append(f"    seed {p['seed']}, {q['epochs']} epochs x {q['iters_per_epoch']} iterations")
            for key, run in runs.items():
                if run["status"] != "ok":
                    lines.append(f"    {key}: {run['status']}")
                else:
                    lines.append(
                        f"    {key:<6} ran as {run['precision']:<15} final ACC {run['acc']:.3f}, ASR {run['asr']:.3f} "
                        f"({_duration(run['seconds'])})"
                    )
            if "max_abs_loss_diff" in p:
                a, b = runs["fp32"]["loss_curve"], runs["bf16"]["loss_curve"]
                lines.append(f"    {'epoch':>9}{'loss_S fp32':>14}{'loss_S bf16':>14}")
                step = max(1, math.ceil(len(a) / 10))
                shown = sorted(set(range(0, len(a), step)) | {len(a) - 1})
                for i in shown:
                    lines.append(f"    {i + 1:>9}{a[i]:>14.5f}{b[i]:>14.5f}")
                lines.append(
                    f"    max |loss_S fp32 - bf16| over epochs {p['max_abs_loss_diff']:.5f}; "
                    f"final loss relative difference {p['final_loss_rel_diff']:.1%}"
                )
            if out["machine"]["gpu"] is None:
                lines.append(
                    "    (on the CPU both runs are float32: bf16 autocast is CUDA-only, trials.device.use_amp)"
                )
        lines.append("")

    if "pack" in parts:
        p = parts["pack"]
        lines.append(f"(5) packed trials on one device, separate processes, {_duration(p['seconds'])}")
        if _failed(p):
            lines.append(f"    {_failed(p)}")
        else:
            lines.append(
                f"    FT on the teacher ({p['model']}), {p['params']}; trials/s summed over the processes"
            )
            lines.append(
                f"    {'processes':>9}{'trials':>8}{'wall':>9}{'trials/s':>10}{'images/s':>11}{'s/trial':>9}{'vs one':>8}"
            )
            for key, row in p["runs"].items():
                lines.append(
                    f"    {row['processes']:>9}{row['trials']:>8}{row['wall_s']:>8.1f}s{row['trials_per_s']:>10.3f}"
                    f"{row['images_per_s']:>11,.0f}{row['seconds_per_trial']:>9.1f}{p['ratios'][key]:>7.2f}x"
                )
        lines.append("")

    lines.append("targets (for an H100/H200-class GPU)")
    if not out["targets"]:
        lines.append("    none measured")
    for row in out["targets"]:
        measured = _duration(row["measured"]) if row["unit"] == "s" else f"{row['measured']:.2f}x"
        bound = _duration(row["target"]) if row["unit"] == "s" else f"{row['target']:.1f}x"
        sign = "<=" if row["at_most"] else ">="
        lines.append(
            f"    {row['name']:<50}{measured:>10}  target {sign} {bound:<8} {_verdict(row['met'], smoke)}"
            f"  ({row['note']})"
        )
    over = "" if out["seconds"] <= BUDGET_S or smoke else f" -- OVER the {BUDGET_S // 60}-minute budget"
    lines.append("")
    lines.append(f"total: {_duration(out['seconds'])}{over}")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------
def _parts(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"parts are a comma-separated subset of {','.join(PARTS)}")
    return tuple(n for n in PARTS if n in names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_check.py",
        description="Data path, ResNet-18 training, DHBE speed and precision, and packed trials on one "
        "CUDA GPU, against the performance targets; at most 8 minutes.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="every part with tiny sizes (on the CPU by default)"
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default=PARTS,
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument("--json", default="gpu_check.json", metavar="PATH", help="where the JSON goes")
    parser.add_argument(
        "--data-root",
        default=None,
        help="CIFAR-10 for the teacher: a folder holding cifar-10-batches-py/ or an imagefolder train/ + "
        "test/ tree (default: synthetic gratings)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda; with --smoke, cpu"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device_name = args.device or ("cpu" if args.smoke else "cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if device_name == "cpu" and not args.smoke:
        parser.error("the full sizes are for a GPU; --smoke runs every part on the CPU with tiny sizes")

    def say(msg: str) -> None:
        print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)

    check = Check(
        sizes=SMOKE if args.smoke else FULL,
        device=torch.device(device_name),
        parts=args.parts,
        data_root=args.data_root,
        seed=args.seed,
        smoke=args.smoke,
    )
    out = run_check(check, say)
    print(format_report(out))
    Path(args.json).write_text(json.dumps(out, indent=2, default=_jsonable))
    say(f"wrote {args.json}")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
