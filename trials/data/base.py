"""Tensor-resident image data: every split is a uint8 NCHW tensor on the trial's device.

A dataset component only reads its source into numpy (`load_raw`); `prepare` then makes the
splits that every trial shares, all seeded by the dataset's `split_seed` (not the trial seed), so
an attack and the defenses run on it agree on which images are which:

- `train`: what the attacker trains on (the training split less the held-out part);
- `heldout`: a seeded part of the training split that the attacker never sees, the pool from which
  defenses draw their unlabeled or clean labeled images (BackdoorBench's `clean_val`);
- `val` / `report`: the test split divided once, stratified, into a validation half (what tuning
  and any selection may see) and a report half (what tables show).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from trials.errors import InvalidValue
from trials.params import NoParams, param


@dataclass
class RawImages:
    """A dataset as read from its source: HWC or NCHW uint8 arrays and int labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]


@dataclass(frozen=True)
class SplitParams:
    """Parameters every dataset shares."""

    heldout_fraction: float = param(
        0.1, "fraction of the training split held out from the attacker, for defenses", low=0.0, high=0.5
    )
    split_seed: int = param(0, "seed of the held-out and validation/report splits (shared by all trials)")
    train_subset: int = param(
        0, "use a stratified subset of this many attacker training images (0 = all)", low=0
    )
    test_subset: int = param(
        0, "use a stratified subset of this many test images before halving (0 = all)", low=0
    )


@dataclass
class ImageData:
    """All splits of one dataset, resident on one device."""

    name: str
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # whether a horizontal flip keeps an image's meaning (not for digits or signs)
    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    report_x: torch.Tensor
    report_y: torch.Tensor
    train_split_size: int  # size of the whole training split: data budgets are fractions of it
    heldout_index: np.ndarray  # indices of the held-out images in the original training split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> ImageData:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "train": len(self.train_y),
            "heldout": len(self.heldout_y),
            "val": len(self.val_y),
            "report": len(self.report_y),
            "mean": [round(m, 4) for m in self.mean],
            "std": [round(s, 4) for s in self.std],
        }


class Dataset(abc.ABC):
    """A registered dataset. Subclasses read their source; splits and devices are handled here."""

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    flip: ClassVar[bool] = True
    needs_root: ClassVar[bool] = True  # reads files from --data-root (False: embedded data)
    # The training recipe `bdlab attack` uses on this dataset unless told otherwise: overrides of
    # trials.training.TrainRecipe's defaults (the DHBE paper's 200-epoch recipe), sized for a CPU.
    recipe: ClassVar[dict[str, Any]] = {}
    # Normalization statistics used by the literature for this dataset; None = computed from train.
    mean: ClassVar[tuple[float, ...] | None] = None
    std: ClassVar[tuple[float, ...] | None] = None

    def __init__(self, params: Any, split: SplitParams, root: str | None) -> None:
        self.params = params
        self.split = split
        self.root = root

    @abc.abstractmethod
    def load_raw(self) -> RawImages:
        """Read the source into uint8 arrays (HWC or NCHW) and integer labels."""

    def load(self, device: torch.device | str = "cpu") -> ImageData:
        raw = self.load_raw()
        return prepare(raw, self.name, self.split, self.flip, self.mean, self.std, device)


def _nchw(x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:  # grayscale N,H,W -> 3 channels, so every model and trigger applies unchanged
        x = np.repeat(x[:, None], 3, axis=1)
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x))


def stratified_halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into two halves with (as near as possible) equal class counts and sizes."""
    first, second = [], []
    n_first = n_second = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = len(idx) // 2 + (len(idx) % 2 if n_first <= n_second else 0)
        first.append(idx[:cut])
        second.append(idx[cut:])
        n_first, n_second = n_first + cut, n_second + len(idx) - cut
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def stratified_sample(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of `total` indices, each class getting its share (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = total / max(len(labels), 1) * counts
    take = np.floor(exact).astype(np.int64)
    remainder = exact - take + rng.random(len(classes)) * 1e-9  # tiny noise breaks ties at random
    for i in np.argsort(-remainder)[: total - int(take.sum())]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def prepare(
    raw: RawImages,
    name: str,
    split: SplitParams,
    flip: bool,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    device: torch.device | str,
) -> ImageData:
    train_x, test_x = _nchw(raw.train_x), _nchw(raw.test_x)
    train_y = np.asarray(raw.train_y, dtype=np.int64)
    test_y = np.asarray(raw.test_y, dtype=np.int64)
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError(f"dataset {name}: images and labels differ in length")
    rng = np.random.default_rng(split.split_seed)
    heldout = stratified_sample(train_y, int(round(split.heldout_fraction * len(train_y))), rng)
    keep = np.setdiff1d(np.arange(len(train_y)), heldout)
    if 0 < split.train_subset < len(keep):  # quick checks on a part of a large dataset
        keep = keep[stratified_sample(train_y[keep], split.train_subset, rng)]
    test_pool = np.arange(len(test_y))
    if 0 < split.test_subset < len(test_y):
        test_pool = stratified_sample(test_y, split.test_subset, rng)
    val, report = (test_pool[h] for h in stratified_halves(test_y[test_pool], rng))
    if mean is None or std is None:
        pixels = train_x[torch.from_numpy(keep)].float().div_(255)
        mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
        std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())

    def t(x: torch.Tensor | np.ndarray, idx: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(x)
        return x[torch.from_numpy(idx)].contiguous().to(device)

    return ImageData(
        name=name,
        class_names=list(raw.class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        flip=flip,
        train_x=t(train_x, keep),
        train_y=t(train_y, keep),
        heldout_x=t(train_x, heldout),
        heldout_y=t(train_y, heldout),
        val_x=t(test_x, val),
        val_y=t(test_y, val),
        report_x=t(test_x, report),
        report_y=t(test_y, report),
        train_split_size=len(train_y),
        heldout_index=heldout,
    )


def require_root(root: str | None, dataset: str, expected: str) -> str:
    import os

    if not root:
        raise InvalidValue("--data-root", root, f"dataset {dataset} needs a local folder holding {expected}")
    if not os.path.isdir(root):
        raise InvalidValue("--data-root", root, f"no such folder; dataset {dataset} expects {expected}")
    return root
