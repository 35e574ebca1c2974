"""The attack contract.

An attack has typed parameters (its `Params` dataclass, defaults from the papers), and:
- chooses and poisons training images (`poison`), keeping the indices and the new labels;
- stamps its test-time trigger on any float batch on the device (`apply`), and, for patch triggers,
  the amplified x4/x5/x9 versions (`apply_amplified`);
- renders its trigger as an image (`render_trigger`);
- may change how the backdoored model is trained, through the same interface and never through
  special cases in the runner: `setup` (e.g. train a clean reference model, optimize a trigger),
  `initial_model` (start from another model), `trainable_parameters` (train only some layers) and
  `batch_hook` (transform every training batch, e.g. WaNet's noise mode);
- saves and restores what it learned or drew (`state`, `load_state`) so that evaluation after a
  defense stamps exactly the trigger that was implanted.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from trials.data.pipeline import to_float, to_uint8
from trials.errors import InvalidValue
from trials.params import param

if TYPE_CHECKING:
    from trials.data.base import ImageData
    from trials.training import TrainRecipe


@dataclass(frozen=True)
class TargetParams:
    """Fields that every attack has."""

    target: int = param(0, "target label (all-to-one)", low=0)
    all_to_all: bool = param(False, "all-to-all: a triggered image of class y is relabeled (y + 1) mod C")


@dataclass(frozen=True)
class DirtyLabelParams(TargetParams):
    """Poisoning budget of dirty-label attacks, relative to the attacker's training set."""

    ratio: float = param(
        0.1, "fraction of the training set poisoned (BackdoorBench pratio)", low=0.0, high=1.0
    )
    count: int | None = param(None, "exact number of poisoned images; overrides ratio (DHBE: 300)", low=1)
    from_target_class: bool = param(
        True, "poisons may include target-class images (BackdoorBench); false: non-target only (DHBE)"
    )


@dataclass(frozen=True)
class CleanLabelParams(TargetParams):
    """Poisoning budget of clean-label attacks, relative to the target class (not the whole set)."""

    target_ratio: float = param(
        0.8, "fraction of the target class's training images poisoned", low=0.0, high=1.0
    )


@dataclass
class PoisonedSet:
    """The attacker's training set after poisoning, on the device."""

    images: torch.Tensor  # uint8 N,C,H,W: clean images with the poisoned ones replaced
    labels: torch.Tensor  # int64 N: labels after poisoning
    index: torch.Tensor  # int64: indices (into the attacker's training set) of poisoned images
    original_labels: torch.Tensor  # int64: the labels those images had


class AttackContext:
    """What an attack's `setup` may use: data, device, seeded generator, recipe, model name.

    `clean_model()` trains (once) a clean reference model of the trial's architecture with the
    trial's recipe on the clean training set; the runner reports its metrics beside the attack's.
    """

    def __init__(
        self,
        data: ImageData,
        model_name: str,
        recipe: TrainRecipe,
        generator: torch.Generator,
        amp: bool,
        progress: Any = None,
    ) -> None:
        self.data = data
        self.model_name = model_name
        self.recipe = recipe
        self.generator = generator
        self.amp = amp
        self.progress = progress
        self._clean_model: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def has_clean_model(self) -> bool:
        return self._clean_model is not None

    def new_model(self) -> nn.Module:
        from trials.device import prepare_model
        from trials.models import build_model

        d = self.data
        model = build_model(self.model_name, d.num_classes, d.image_shape[-1], d.mean, d.std)
        return prepare_model(model, self.device, self.amp)

    def clean_model(self) -> nn.Module:
        if self._clean_model is None:
            from trials.training import train_classifier

            model = self.new_model()
            train_classifier(
                model,
                self.data.train_x,
                self.data.train_y,
                self.recipe,
                generator=self.generator,
                flip_allowed=self.data.flip,
                amp=self.amp,
                progress=self.progress,
                tag="clean_reference",
            )
            self._clean_model = model.eval()
        return self._clean_model


class Attack(abc.ABC):
    """Base of every registered attack. See the module docstring for the contract."""

    name: ClassVar[str]
    Params: ClassVar[type] = TargetParams
    patch_trigger: ClassVar[bool] = False  # amplified (x4/x5/x9) evaluation applies
    clean_label: ClassVar[bool] = False

    def __init__(self, params: Any, num_classes: int, image_shape: tuple[int, int, int], seed: int) -> None:
        self.params = params
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.seed = seed
        if params.target >= num_classes:
            raise InvalidValue(
                f"attack {self.name}: param 'target'", params.target, f"must be < {num_classes} classes"
            )
        if self.clean_label and params.all_to_all:
            raise InvalidValue(
                f"attack {self.name}: param 'all_to_all'", True, "a clean-label attack is all-to-one"
            )

    # --- the trigger ------------------------------------------------------------------------
    @abc.abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger on a float batch in [0, 1] (N,C,H,W), on x's device."""

    def apply_amplified(self, x: torch.Tensor, preset: str) -> torch.Tensor:
        """x4 / x5 / x9 multi-stamp versions; only for patch triggers."""
        raise NotImplementedError(f"attack {self.name} has no patch trigger to amplify")

    def render_trigger(self) -> torch.Tensor:
        """The trigger as a 3xHxW image in [0, 1]: by default, stamped on a mid-gray image."""
        gray = torch.full((1, *self.image_shape), 0.5)
        return self.apply(gray)[0]

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label a successful backdoor produces for triggered images of true class y."""
        if self.params.all_to_all:
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.params.target)

    def attacked_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Which test images count for ASR: non-target ones (all of them for all-to-all)."""
        if self.params.all_to_all:
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.params.target

    # --- poisoning --------------------------------------------------------------------------
    def select(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices of the training images to poison (dirty-label default: ratio or count)."""
        p = self.params
        candidates = torch.arange(len(labels), device=labels.device)
        if not getattr(p, "from_target_class", True) and not p.all_to_all:
            candidates = candidates[labels != p.target]
        count = p.count if p.count is not None else int(round(p.ratio * len(labels)))
        if count > len(candidates):
            raise InvalidValue(
                f"attack {self.name}: param 'count'", count, f"at most {len(candidates)} candidates"
            )
        perm = torch.randperm(len(candidates), device=labels.device, generator=generator)
        return candidates[perm[:count]].sort().values

    def poison_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """New labels of the selected images (clean-label attacks keep them)."""
        return labels.clone() if self.clean_label else self.target_labels(labels)

    def poison_images(self, x: torch.Tensor, labels: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        """Poison the selected uint8 images; by default stamp the trigger and store as uint8,
        as the original repositories paste triggers on the image files before augmentation."""
        return to_uint8(self.apply(to_float(x)))

    def poison(self, images: torch.Tensor, labels: torch.Tensor, ctx: AttackContext) -> PoisonedSet:
        index = self.select(labels, ctx.generator)
        poisoned_images = images.clone()
        poisoned_labels = labels.clone()
        if len(index):
            poisoned_images[index] = self.poison_images(images[index], labels[index], ctx)
            poisoned_labels[index] = self.poison_labels(labels[index])
        return PoisonedSet(poisoned_images, poisoned_labels, index, labels[index].clone())

    # --- training-procedure hooks (defaults: a plain supervised run from scratch) ------------
    def setup(self, ctx: AttackContext) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare before poisoning (train a reference model, optimize a trigger, ...)."""

    def initial_model(self, ctx: AttackContext) -> nn.Module | None:
        """The model the backdoored training starts from; None = a fresh one."""
        return None

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter] | None:
        """Parameters trained during backdoor training; None = all of them."""
        return None

    def batch_hook(
        self, x: torch.Tensor, y: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ):  # noqa: ANN201
        """Per training batch, after augmentation (float images); `poisoned` marks the batch rows
        that are poisoned training images. Attacks that stamp after augmentation do it here."""
        if self.stamps_after_augmentation and bool(poisoned.any()):
            x = x.clone()
            x[poisoned] = self.apply(x[poisoned])
        return x, y

    has_batch_hook: ClassVar[bool] = False
    # True: the training loop sees the clean pixels of the poisoned images (with their new labels)
    # and `batch_hook` stamps the trigger after augmentation, as WaNet's official code does; the
    # stored PoisonedSet still holds the stamped images, for the record and for defenses.
    stamps_after_augmentation: ClassVar[bool] = False

    # --- state needed to re-stamp the same trigger later ------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that define the trigger beyond params and seed (saved as safetensors)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Restore what `state` returned."""


def select_target_class(
    labels: torch.Tensor, target: int, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """A seeded `ratio` of the target class's training images (for clean-label attacks)."""
    candidates = torch.nonzero(labels == target).flatten()
    count = int(round(ratio * len(candidates)))
    perm = torch.randperm(len(candidates), device=labels.device, generator=generator)
    return candidates[perm[:count]].sort().values
