"""The defense interface: typed parameters, the data a defense declares, and the context it runs in.

A defense receives the backdoored model, the data it declared (and nothing else), and a context:

    class MyDefense(Defense):
        Params = MyParams                  # typed, paper defaults (trials.params.param)
        data_kind = "unlabeled"            # none | unlabeled | clean_labeled | poisoned_train

        def run(self, model, data, ctx) -> nn.Module:
            ...                            # reads like the paper's algorithm
            ctx.report({"step": s, "loss": l}, model)   # progress, with validation ACC/ASR
            return model

Data kinds (the runner hands over exactly what is declared):
- `none`: no images, only the shapes (DHBE, CLP);
- `unlabeled`: images from the training split's held-out part, labels withheld (BCU);
- `clean_labeled`: images and true labels from the held-out part (AFT, fine-tuning baselines);
- `poisoned_train`: the attacker's poisoned training set, labels as poisoned (PBE).
The amount of unlabeled or clean data is the defense's `data_fraction` (of the training split's
size, the convention of the papers: BCU's 5,000 CIFAR-10 images are 10 %) or `data_count`.

Training precision (`precision`, on CUDA only; the CPU always runs float32):
- `amp` (the default): bf16 autocast and channels_last, `ctx.amp` True;
- `fp32`: float32 with TF32 matmuls / convolutions allowed, `ctx.amp` False. Declared by the erasers
  whose losses compare nearly equal logits: DHBE (L1 between teacher and student logits, whose
  gradient is a sign that bf16 rounding zeroes for many entries), BCU (distillation) and PBE (the
  cosine similarity of logits that picks the pool); and by those that never autocast (I-BAU,
  CLP, identity), so that what is recorded is what runs.
A trial may override it (`DefenseSpec.amp`); the precision used is recorded in spec.yaml.
Evaluation (ACC, ASR, every metric, the monitor) is always IEEE float32 (`trials.metrics.logits`).

A defense never imports an attack, Ray, MLflow or Optuna: it does not know what it removes; the
runner evaluates the trigger through `ctx.monitor` and after `run` returns.
"""

from __future__ import annotations

import abc
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from trials.params import param

DataKind = Literal["none", "unlabeled", "clean_labeled", "poisoned_train"]
DATA_KINDS: tuple[str, ...] = typing.get_args(DataKind)
Precision = Literal["amp", "fp32"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def data_fraction_param(
    default: float, doc: str = "images to use, as a fraction of the training split's size"
):
    """The `data_fraction` field with a defense's own default (and the protocol it comes from)."""
    return param(default, doc, low=0.0, high=1.0, low_exclusive=True)


@dataclass(frozen=True)
class DataBudgetParams:
    """For defenses that take unlabeled or clean labeled images from the held-out part."""

    data_fraction: float = data_fraction_param(0.1)
    data_count: int | None = param(None, "images to use, as a count (overrides data_fraction)", low=1)

    def data_amount(self, train_split_size: int) -> int:
        if self.data_count is not None:
            return self.data_count
        return max(1, int(round(self.data_fraction * train_split_size)))


@dataclass
class DefenseData:
    """What a defense gets: uint8 images on the device, labels where its kind has them."""

    kind: str
    images: torch.Tensor | None
    labels: torch.Tensor | None
    source: str
    num_classes: int
    image_shape: tuple[int, int, int]
    flip: bool  # whether horizontal flips keep an image's meaning (augmentation)

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": len(self), "source": self.source}


Progress = Callable[[dict[str, Any]], None]
Monitor = Callable[[nn.Module], dict[str, float]]


@dataclass
class DefenseContext:
    """Device, seeded generators, progress, validation monitoring and checkpoints for one run."""

    device: torch.device
    seed: int  # the trial's derived seed (trials.device.derive_seed), not the user's
    generator: torch.Generator  # on the device; the defense's only source of randomness there
    amp: bool = False  # train under bf16 autocast, channels_last (CUDA only; see Defense.precision)
    progress: Progress | None = None
    monitor: Monitor | None = None  # runner-side: validation-half ACC/ASR of a model
    checkpoint_dir: Path | None = None
    checkpoint_every_s: float = 600.0  # wall-clock interval between checkpoints
    # called with `checkpoint_dir` after each checkpoint (the platform mirrors it to shared storage)
    checkpoint_saved: Callable[[Path], None] | None = None
    tag: str = "defense"
    # what a defense found along the way (NC's anomaly index, FP's pruned count...), written to
    # metrics.json under "findings"
    findings: dict[str, Any] = field(default_factory=dict)
    _last_checkpoint: float = field(default_factory=time.monotonic)

    def cpu_generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the trial seed (for things drawn on the CPU)."""
        return torch.Generator().manual_seed((self.seed + 1000 * offset) % 2**63)

    def report(self, record: dict[str, Any], model: nn.Module | None = None) -> None:
        """Report one step; with `model`, the runner adds its validation ACC/ASR (model state is kept)."""
        record = {"phase": self.tag, **record}
        if model is not None and self.monitor is not None:
            was_training = model.training
            record.update(self.monitor(model))
            model.train(was_training)
        if self.progress is not None:
            self.progress(record)

    # --- checkpoints (long defenses resume from their last one) -----------------------------------
    def checkpoint_due(self) -> bool:
        return (
            self.checkpoint_dir is not None
            and time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        )

    def save_checkpoint(self, step: int, objects: dict[str, Any]) -> None:
        """Save modules, optimizers, schedulers and generators under their names, with `step` done."""
        if self.checkpoint_dir is None:
            return
        from trials.checkpoint import save_state

        state = {name: _state_of(obj) for name, obj in objects.items()}
        state["__generator__"] = self.generator.get_state()
        save_state({"step": step, "state": state}, self.checkpoint_dir)
        if self.checkpoint_saved is not None:
            self.checkpoint_saved(self.checkpoint_dir)
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self, objects: dict[str, Any]) -> int:
        """Restore the objects from the last checkpoint; returns the steps already done (0 if none)."""
        if self.checkpoint_dir is None:
            return 0
        from trials.checkpoint import load_state

        saved = load_state(self.checkpoint_dir)
        if saved is None:
            return 0
        for name, obj in objects.items():
            _load_into(obj, saved["state"][name])
        self.generator.set_state(saved["state"]["__generator__"].cpu())
        return int(saved["step"])


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state.cpu())
    else:
        obj.load_state_dict(state)


class Defense(abc.ABC):
    """Base class of every defense; see the module docstring."""

    name: ClassVar[str]
    Params: ClassVar[type]
    data_kind: ClassVar[DataKind] = "none"
    precision: ClassVar[Precision] = "amp"  # training precision on CUDA (module docstring)
    changes_model: ClassVar[bool] = True  # False only for the no-defense reference (`identity`)

    def __init__(self, params: Any) -> None:
        self.params = params

    def data_amount(self, train_split_size: int) -> int | None:
        """How many unlabeled / clean images the defense asks for (None: not applicable)."""
        if self.data_kind in ("unlabeled", "clean_labeled"):
            return self.params.data_amount(train_split_size)
        return None

    @abc.abstractmethod
    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        """Return the defended model (same architecture); `model` is a private copy to change freely."""
