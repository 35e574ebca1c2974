"""Data-path benchmark: the tensor-resident data path against a conventional torchvision pipeline.

    .venv/bin/python benchmarks/data_path.py                    # digits (embedded), a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/data_path.py --synthetic 50000  # CIFAR-sized random data, no download
    .venv/bin/python benchmarks/data_path.py --help

Both pipelines deliver the same thing: a shuffled batch of the poisoned training set (BadNets, 10 %
of the images stamped and relabeled), randomly cropped with 4 pixels of zero padding and randomly
flipped, as a float tensor in [0, 1] on the device with its labels.

- ours, pre-poisoned (what `trials.training` runs): the poisoned uint8 images lie on the device,
  stamped once (`Attack.poison`); a batch is an index into them, one batched crop+flip, `to_float`;
- ours, data path on 1 CPU thread (CPU only): the same inside `pipeline.single_threaded`, which
  keeps it fast when other processes compete for the cores;
- ours, stamped per batch: the clean uint8 images lie on the device and each batch's poisoned rows
  are stamped with `Attack.apply` before the augmentation (the same output, the stamping cost paid
  every batch);
- conventional: a `torch.utils.data.Dataset` over uint8 HWC numpy images whose `__getitem__` makes a
  PIL image, pastes the trigger per sample when the index is poisoned, and applies torchvision's
  RandomCrop(padding=4) + RandomHorizontalFlip + ToTensor; a DataLoader (shuffle, persistent
  workers, pinned memory on CUDA) batches it, and the batch is moved to the device.

Measured: (a) images/s of the data path alone; (b) training images/s (forward, backward, SGD step)
fed by each pipeline; (c) the share of a training step spent outside the model (getting the batch
ready) for each pipeline. Clocks are read after `torch.cuda.synchronize` on CUDA; bf16 autocast and
channels_last are used on CUDA only (`trials.device`). The pipelines take turns (rounds), each run
on a fresh stream, so that a change in the machine's load hits all of them alike; the report says
how busy the CPUs were with other work, since on a shared machine that dominates the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trials.attacks import make_attack
from trials.attacks.badnets import BadNets
from trials.data.pipeline import Augment, batch_indices, single_threaded, to_float, to_uint8
from trials.device import autocast, make_generator, pick_device, prepare_input, prepare_model, use_amp
from trials.models import build_model
from trials.training import TrainRecipe, make_optimizer

PAD = 4  # random-crop padding of both pipelines
POISON_RATIO = 0.1
# Timed training steps and warm-up steps per model when --steps / --warmup are not given.
DEFAULT_STEPS = {"mini_resnet": 20, "resnet18": 6}
DEFAULT_WARMUP = {"mini_resnet": 2, "resnet18": 1}
FALLBACK_STEPS, FALLBACK_WARMUP = 10, 2
# Targets stated by the issue.
TARGET_SPEEDUP = 5.0  # data path alone: ours at least 5x the conventional pipeline
TARGET_SHARE = 0.10  # data path at most 10 % of a training step

Batch = tuple[torch.Tensor, torch.Tensor]
Progress = Callable[[str], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the data ---------------------------------------------------------------------------------
@dataclass
class BenchData:
    """The attacker's training set on the device, poisoned once, with what the pipelines need."""

    name: str
    clean: torch.Tensor  # uint8 N,C,H,W on the device
    poisoned: torch.Tensor  # the same with the poisoned rows stamped (uint8, as stored)
    labels: torch.Tensor  # int64 N: labels after poisoning
    is_poisoned: torch.Tensor  # bool N
    attack: BadNets
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.labels)


def load_bench_data(
    dataset: str, synthetic: int | None, device: torch.device, seed: int, data_root: str | None = None
) -> BenchData:
    if synthetic:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (synthetic, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
        labels = torch.randint(0, 10, (synthetic,), generator=gen).to(device)
        name, num_classes, mean, std = (
            f"synthetic ({synthetic:,} random CIFAR-sized images)",
            10,
            (0.5,) * 3,
            (0.29,) * 3,
        )
    else:
        from trials.data import load_dataset

        data = load_dataset(dataset, root=data_root, device=device)
        images, labels = data.train_x, data.train_y
        name, num_classes, mean, std = dataset, data.num_classes, data.mean, data.std
    attack = make_attack("badnets", {"ratio": POISON_RATIO}, num_classes, tuple(images.shape[1:]), seed)
    assert isinstance(attack, BadNets)
    # Attack.poison only needs the context's generator for BadNets.
    ctx: Any = types.SimpleNamespace(generator=make_generator(device, seed))
    poisoned = attack.poison(images, labels, ctx)
    mask = torch.zeros(len(labels), dtype=torch.bool, device=device)
    mask[poisoned.index] = True
    return BenchData(name, images, poisoned.images, poisoned.labels, mask, attack, num_classes, mean, std)


# --- the pipelines: endless streams of ready batches -------------------------------------------
class ResidentStream:
    """Ours: batches indexed out of the resident uint8 tensor, augmented in one batched op."""

    def __init__(
        self,
        data: BenchData,
        batch_size: int,
        amp: bool,
        seed: int,
        stamp_per_batch: bool = False,
        single_thread: bool = False,
    ) -> None:
        self.data, self.batch_size, self.amp = data, batch_size, amp
        self.stamp_per_batch, self.single_thread = stamp_per_batch, single_thread
        self.images = data.clean if stamp_per_batch else data.poisoned
        self.generator = make_generator(data.clean.device, seed)
        self.augment = Augment(pad=PAD, flip=True)
        self._epoch = self._new_epoch()

    def _new_epoch(self):  # noqa: ANN202
        return batch_indices(
            self.data.size,
            self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self.generator,
            device=self.images.device,
        )

    def _next_index(self) -> torch.Tensor:
        try:
            return next(self._epoch)
        except StopIteration:
            self._epoch = self._new_epoch()
            return next(self._epoch)

    def __next__(self) -> Batch:
        if self.single_thread:
            with single_threaded(self.images.device):
                return self._batch()
        return self._batch()

    def _batch(self) -> Batch:
        idx = self._next_index()
        x = self.images[idx]
        if self.stamp_per_batch:
            rows = torch.nonzero(self.data.is_poisoned[idx]).flatten()
            x[rows] = to_uint8(self.data.attack.apply(to_float(x[rows])))
        x = to_float(self.augment(x, self.generator))
        return prepare_input(x, self.amp), self.data.labels[idx]

    def close(self) -> None:
        pass


class PoisonedImageDataset(torch.utils.data.Dataset):
    """The conventional per-sample dataset: PIL image, BadNets patch pasted when poisoned, transforms."""

    def __init__(
        self,
        images_hwc: np.ndarray,
        labels: np.ndarray,
        is_poisoned: np.ndarray,
        patch_hwc: np.ndarray,
        position: tuple[int, int],
        pad: int,
        flip: bool,
    ) -> None:
        from torchvision import transforms

        self.images, self.labels, self.is_poisoned = images_hwc, labels, is_poisoned
        self.patch, self.position = patch_hwc, position
        steps: list[Any] = [transforms.RandomCrop(images_hwc.shape[1], padding=pad)]
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps.append(transforms.ToTensor())
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i])
        if self.is_poisoned[i]:
            pixels = np.array(img)
            top, left = self.position
            ph, pw = self.patch.shape[:2]
            pixels[top : top + ph, left : left + pw] = self.patch
            img = Image.fromarray(pixels)
        return self.transform(img), int(self.labels[i])


class LoaderStream:
    """Conventional: a DataLoader over `PoisonedImageDataset`, batches moved to the device."""

    def __init__(self, data: BenchData, batch_size: int, amp: bool, seed: int, workers: int) -> None:
        device = data.clean.device
        patch = to_uint8(data.attack.patch).permute(1, 2, 0).numpy()
        dataset = PoisonedImageDataset(
            np.ascontiguousarray(data.clean.permute(0, 2, 3, 1).cpu().numpy()),  # HWC, as stored on disk
            data.labels.cpu().numpy(),
            data.is_poisoned.cpu().numpy(),
            np.ascontiguousarray(patch),
            data.attack.position,
            PAD,
            True,
        )
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )
        self.device, self.amp = device, amp
        self._it = iter(self.loader)

    def __next__(self) -> Batch:
        try:
            x, y = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            x, y = next(self._it)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return prepare_input(x, self.amp), y

    def close(self) -> None:
        del self._it, self.loader  # shuts persistent workers down
        gc.collect()


@dataclass(frozen=True)
class Pipeline:
    key: str
    label: str
    make: Callable[[BenchData, int, bool, int], Any]
    workers: int | None = None  # DataLoader workers of a conventional pipeline; None: ours

    @property
    def ours(self) -> bool:
        return self.workers is None


def pipelines(workers: Sequence[int], device: torch.device) -> list[Pipeline]:
    out = [
        Pipeline(
            "ours",
            "ours (as training.py)",
            lambda d, b, f, s: ResidentStream(d, b, f, s),
        ),
    ]
    if device.type == "cpu":
        out.append(
            Pipeline(
                "ours_1t",
                "ours, data path on 1 CPU thread",
                lambda d, b, f, s: ResidentStream(d, b, f, s, single_thread=True),
            )
        )
    out.append(
        Pipeline(
            "ours_stamp",
            "ours, trigger stamped per batch",
            lambda d, b, f, s: ResidentStream(d, b, f, s, stamp_per_batch=True),
        )
    )
    for w in workers:
        out.append(
            Pipeline(
                f"conventional_w{w}",
                f"conventional, {w} worker{'s' if w != 1 else ''}",
                lambda d, b, f, s, w=w: LoaderStream(d, b, f, s, workers=w),
                w,
            )
        )
    return out


# --- measurements -------------------------------------------------------------------------------
def time_data_path(stream: Any, batches: int, warmup: int, device: torch.device) -> tuple[float, int]:
    """Seconds for `batches` batches of the stream alone, after `warmup` untimed ones; and images."""
    for _ in range(warmup):
        next(stream)
    _sync(device)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += len(next(stream)[1])
    _sync(device)
    return time.perf_counter() - start, images


def data_path_summary(runs: list[tuple[float, int]], batches: int) -> dict[str, Any]:
    rates = [images / seconds for seconds, images in runs]
    median = statistics.median(rates)
    return {
        "batches": batches,
        "repeats": len(runs),
        "ms_per_batch": 1e3 * statistics.median(seconds / batches for seconds, _ in runs),
        "images_per_s": median,
        "images_per_s_best": max(rates),
        "images_per_s_runs": rates,
    }


class Trainer:
    """One model and its SGD optimizer, trained step by step on batches from a stream."""

    def __init__(self, data: BenchData, model_name: str, device: torch.device, amp: bool, seed: int) -> None:
        torch.manual_seed(seed)
        model = build_model(model_name, data.num_classes, data.clean.shape[-1], data.mean, data.std)
        self.model = prepare_model(model, device, amp).train()
        self.optimizer = make_optimizer(self.model.parameters(), TrainRecipe(lr=0.01))
        self.device, self.amp = device, amp
        self.data_s = self.total_s = 0.0
        self.steps = self.images = 0

    def step(self, stream: Any, timed: bool) -> None:
        """One training step: (batch ready) then forward, backward and SGD step, clocked on a sync."""
        _sync(self.device)
        start = time.perf_counter()
        x, y = next(stream)
        _sync(self.device)
        ready = time.perf_counter()
        with autocast(self.device, self.amp):
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        if timed:
            self.data_s += ready - start
            self.total_s += time.perf_counter() - start
            self.steps += 1
            self.images += len(y)

    def summary(self, warmup: int, rounds: int) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "warmup": warmup,
            "rounds": rounds,
            "ms_per_step": 1e3 * self.total_s / self.steps,
            "images_per_s": self.images / self.total_s,
            "data_ms_per_step": 1e3 * self.data_s / self.steps,
            "data_share": self.data_s / self.total_s,
        }


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _proc_stat() -> tuple[float, float] | None:
    """(total, busy) CPU seconds of the whole machine since boot, from Linux's /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    total = sum(fields) / tick
    return total, total - (fields[3] + fields[4]) / tick  # less idle and iowait


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # DataLoader workers: children


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent busy over the next `seconds` (Linux /proc/stat; else None)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def run_bench(
    *,
    dataset: str = "digits",
    synthetic: int | None = None,
    data_root: str | None = None,
    batch_size: int = 128,
    steps: int | None = None,
    warmup: int | None = None,
    models: Sequence[str] = ("mini_resnet", "resnet18"),
    device: str = "auto",
    workers: Sequence[int] = (0, 2),
    data_batches: int = 40,
    repeats: int = 3,
    rounds: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run all measurements; returns a JSON-able dict (`format_report` prints it)."""
    say = progress or (lambda _msg: None)
    dev = pick_device(device)
    amp = use_amp(dev, None)
    started = time.perf_counter()
    load_before = _loadavg()
    busy_before = _cpu_busy()
    stat_before, own_before = _proc_stat(), _own_cpu()
    data = load_bench_data(dataset, synthetic, dev, seed, data_root)
    if data.size < batch_size:
        raise ValueError(f"{data.size} training images: fewer than one batch of {batch_size}")
    result: dict[str, Any] = {
        "environment": environment(dev),
        "setup": {
            "dataset": data.name,
            "train_images": data.size,
            "image_shape": list(data.clean.shape[1:]),
            "poisoned": int(data.is_poisoned.sum()),
            "attack": f"BadNets {data.attack.patch.shape[-1]}x{data.attack.patch.shape[-1]} patch, {POISON_RATIO:.0%}",
            "batch_size": batch_size,
            "augment": f"random crop (pad {PAD}) + horizontal flip",
            "fast_path": amp,
        },
        "data_path": {},
        "training": {},
    }
    plist = pipelines(workers, dev)
    labels = {p.key: p.label for p in plist}
    result["labels"] = labels

    # (a) the data path alone: the pipelines in turn, `repeats` rounds (so that a change in the
    # machine's load hits all of them), each run on a fresh stream (no DataLoader worker runs ahead
    # in the background while another pipeline is timed).
    runs: dict[str, list[tuple[float, int]]] = {p.key: [] for p in plist}
    for r in range(repeats):
        for p in plist:
            say(f"(a) data path, round {r + 1}/{repeats}: {p.label}")
            stream = p.make(data, batch_size, amp, seed + r)
            warm = 3 if p.workers is None else 3 + 2 * p.workers  # past the loader's start and prefetch
            try:
                runs[p.key].append(time_data_path(stream, data_batches, warm, dev))
            finally:
                stream.close()
    for p in plist:
        result["data_path"][p.key] = data_path_summary(runs[p.key], data_batches)

    # (b) + (c) training steps fed by each pipeline (the per-batch stamping variant is left to (a)).
    # The pipelines take turns in `rounds` rounds, each on a fresh stream with its own warm-up, so a
    # change in the machine's load hits all of them and no DataLoader worker runs in the background
    # while another pipeline is timed; every pipeline trains its own model across the rounds.
    for model_name in models:
        n_steps = steps if steps is not None else DEFAULT_STEPS.get(model_name, FALLBACK_STEPS)
        n_warm = warmup if warmup is not None else DEFAULT_WARMUP.get(model_name, FALLBACK_WARMUP)
        n_rounds = max(1, min(rounds, n_steps))
        per_round = -(-n_steps // n_rounds)
        trained = [p for p in plist if p.key != "ours_stamp"]
        trainers = {p.key: Trainer(data, model_name, dev, amp, seed) for p in trained}
        for r in range(n_rounds):
            for p in trained:
                say(
                    f"(b) training {model_name}, round {r + 1}/{n_rounds}: {p.label} ({n_warm} + {per_round} steps)"
                )
                stream = p.make(data, batch_size, amp, seed + r)
                try:
                    for i in range(n_warm + per_round):
                        trainers[p.key].step(stream, timed=i >= n_warm)
                finally:
                    stream.close()
        result["training"][model_name] = {
            key: trainer.summary(n_warm, n_rounds) for key, trainer in trainers.items()
        }
        del trainers
        gc.collect()

    result["summary"] = summarize(result)
    result["seconds"] = time.perf_counter() - started
    result["environment"]["loadavg_before"] = load_before
    result["environment"]["cpu_busy_before"] = busy_before
    result["environment"]["loadavg_after"] = _loadavg()
    stat_after = _proc_stat()
    if stat_before is not None and stat_after is not None:
        machine = stat_after[0] - stat_before[0]
        others = (stat_after[1] - stat_before[1]) - (_own_cpu() - own_before)
        result["environment"]["others_cpu_share"] = max(others, 0.0) / max(machine, 1e-9)
    return result


def _is_ours(key: str) -> bool:
    return not key.startswith("conventional")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios of each of our variants to the best conventional pipeline, and the targets' checks."""
    summary: dict[str, Any] = {"data_path": {}, "training": {}}
    dp = result["data_path"]
    conv = {k: v["images_per_s"] for k, v in dp.items() if not _is_ours(k)}
    if conv:
        best_key = max(conv, key=conv.__getitem__)
        for key, row in dp.items():
            if _is_ours(key):
                ratio = row["images_per_s"] / conv[best_key]
                summary["data_path"][key] = {
                    "vs": best_key,
                    "ratio": ratio,
                    "target": TARGET_SPEEDUP,
                    "met": ratio >= TARGET_SPEEDUP,
                }
    for model_name, rows in result["training"].items():
        conv_t = {k: v["images_per_s"] for k, v in rows.items() if not _is_ours(k)}
        best_t = max(conv_t, key=conv_t.__getitem__) if conv_t else None
        entry: dict[str, Any] = {}
        for key, row in rows.items():
            if _is_ours(key):
                share = row["data_share"]
                entry[key] = {
                    "data_share": share,
                    "target": TARGET_SHARE,
                    "met": share <= TARGET_SHARE,
                    "vs": best_t,
                    "ratio": row["images_per_s"] / conv_t[best_t] if best_t else None,
                }
        summary["training"][model_name] = entry
    return summary


# --- the report ---------------------------------------------------------------------------------
LEGEND = (
    "ours (as training.py): poisoned uint8 images resident on the device (stamped once by Attack.poison);",
    "    batch = index into them, one fused crop+flip gather, to_float",
    "ours, data path on 1 CPU thread: the same inside trials.data.pipeline.single_threaded (CPU only)",
    "ours, trigger stamped per batch: clean resident images; each batch's poisoned rows stamped with",
    "    Attack.apply (as uint8, like the stored poison) before the crop+flip: the same output",
    "conventional, N workers: Dataset.__getitem__ = PIL image from uint8 HWC numpy, BadNets patch pasted",
    "    (numpy) when poisoned, torchvision RandomCrop(pad 4) + RandomHorizontalFlip + ToTensor;",
    "    DataLoader(shuffle, drop_last, persistent workers), batch moved to the device",
)


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def format_report(result: dict[str, Any]) -> str:
    env, setup, labels = result["environment"], result["setup"], result["labels"]
    lines = ["bdlab data-path benchmark", ""]
    gpu = f" ({env['gpu']})" if "gpu" in env else ""
    lines.append(
        f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}, {env['platform']}"
    )
    lines.append(
        f"device {env['device']}{gpu}; CPUs {env['cpu_count']} (usable {env['cpu_affinity']}); "
        f"torch threads {env['torch_threads']} (inter-op {env['torch_interop_threads']}); "
        f"bf16 autocast + channels_last: {'on' if setup['fast_path'] else 'off'}"
    )
    if env.get("loadavg_before") is not None:
        before = ", ".join(f"{v:.2f}" for v in env["loadavg_before"])
        after = ", ".join(f"{v:.2f}" for v in env["loadavg_after"])
        lines.append(f"load average (1/5/15 min) before: {before}; after: {after}")
    busy = env.get("cpu_busy_before")
    if busy is not None:
        lines.append(f"CPU busy (all cores) in the second before the benchmark started: {busy:.0%}")
    others = env.get("others_cpu_share")
    if others is not None:
        lines.append(f"CPU time used by other processes during the benchmark: {others:.0%} of the machine's")
    loaded = (busy is not None and busy > 0.25) or (others is not None and others > 0.10)
    if busy is None and others is None and env.get("loadavg_before") is not None:
        loaded = env["loadavg_before"][0] > 0.5 * env["cpu_affinity"]
    if loaded:
        lines.append(
            "WARNING: other processes competed for the CPUs; the figures are noisy and pessimistic "
            "(run the benchmark on an idle machine)"
        )
    lines.append(
        f"data: {setup['dataset']}, {setup['train_images']:,} training images {'x'.join(map(str, setup['image_shape']))}, "
        f"{setup['poisoned']:,} poisoned ({setup['attack']}); batch {setup['batch_size']}; {setup['augment']}"
    )
    lines.append("pipelines:")
    for text in LEGEND:
        lines.append(f"    {text}")
    lines.append("")

    dp = result["data_path"]
    if dp:
        ours = dp.get("ours", {}).get("images_per_s")
        any_row = next(iter(dp.values()))
        lines.append(
            f"(a) data path alone: fetch + augment + trigger -> float batch on {env['device']} "
            f"(median of {any_row['repeats']} runs x {any_row['batches']} batches, after warm-up; ratios of medians)"
        )
        lines.append(
            f"    {'pipeline':<34}{'ms/batch':>10}{'images/s':>12}{'(best run)':>12}{'ours/this':>11}"
        )
        for key, row in dp.items():
            ratio = f"{ours / row['images_per_s']:.2f}x" if ours else "-"
            lines.append(
                f"    {labels[key]:<34}{row['ms_per_batch']:>10.2f}{_fmt_rate(row['images_per_s']):>12}"
                f"{_fmt_rate(row['images_per_s_best']):>12}{ratio:>11}"
            )
        for key, s in result["summary"]["data_path"].items():
            lines.append(
                f"    => {labels[key]} / best conventional ({labels[s['vs']]}): {s['ratio']:.1f}x; "
                f"target >= {s['target']:.0f}x: {'met' if s['met'] else 'MISSED'}"
            )
        lines.append("")

    tr = result["training"]
    if tr:
        any_row = next(iter(next(iter(tr.values())).values()))
        lines.append(
            "(b) training: forward + backward + SGD step, fed by each pipeline "
            f"(pipelines take turns in {any_row['rounds']} rounds, each after "
            f"{any_row['warmup']} untimed warm-up step(s))"
        )
        lines.append(
            f"    {'model':<13}{'pipeline':<34}{'steps':>6}{'ms/step':>10}{'images/s':>10}{'data share':>12}{'ours/this':>11}"
        )
        for model_name, rows in tr.items():
            ours_t = rows.get("ours", {}).get("images_per_s")
            for key, row in rows.items():
                ratio = f"{ours_t / row['images_per_s']:.2f}x" if ours_t else "-"
                lines.append(
                    f"    {model_name:<13}{labels[key]:<34}{row['steps']:>6}{row['ms_per_step']:>10.1f}"
                    f"{_fmt_rate(row['images_per_s']):>10}{row['data_share']:>11.1%}{ratio:>11}"
                )
        lines.append("")
        lines.append(
            "(c) share of a training step spent outside the model's forward/backward/step "
            "(getting the batch ready), ours:"
        )
        lines.append(
            "    (time from asking for the batch until it is ready on the device, clocks read after a "
            "device synchronisation; on CUDA an upper bound, as the data path could overlap the GPU's work)"
        )
        for model_name, entry in result["summary"]["training"].items():
            for key, sh in entry.items():
                row = tr[model_name][key]
                speed = f"; training images/s / best conventional: {sh['ratio']:.2f}x" if sh["ratio"] else ""
                lines.append(
                    f"    {model_name:<13}{labels[key]:<34}{sh['data_share']:>6.1%} "
                    f"({row['data_ms_per_step']:.2f} of {row['ms_per_step']:.1f} ms/step); "
                    f"target <= {sh['target']:.0%}: {'met' if sh['met'] else 'MISSED'}{speed}"
                )
        lines.append("")
    lines.append(f"total benchmark time: {result['seconds']:.1f} s")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/data_path.py",
        description="Throughput of the tensor-resident data path against a conventional PIL/torchvision "
        "DataLoader pipeline, alone and feeding training steps.",
    )
    parser.add_argument("--dataset", default="digits", help="registered dataset (default: digits, embedded)")
    parser.add_argument("--data-root", default=None, help="folder of a dataset that needs one")
    parser.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="use N random CIFAR-sized (3x32x32) images instead of --dataset (e.g. 50000), no download",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed training steps per model and pipeline (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
        + f", others {FALLBACK_STEPS})",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up training steps (default: 2, resnet18 1)"
    )
    parser.add_argument(
        "--models", default="mini_resnet,resnet18", help="comma-separated models; empty: skip (b)/(c)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--workers", default="0,2", help="DataLoader worker counts of the conventional pipeline"
    )
    parser.add_argument(
        "--data-batches", type=int, default=40, help="batches per timed run of the data path alone"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the data path alone (median)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds the pipelines take turns in during training (b)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run_bench(
        dataset=args.dataset,
        synthetic=args.synthetic,
        data_root=args.data_root,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        models=models,
        device=args.device,
        workers=_int_list(args.workers),
        data_batches=args.data_batches,
        repeats=args.repeats,
        rounds=args.rounds,
        seed=args.seed,
        progress=progress,
    )
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
