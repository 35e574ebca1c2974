"""The one supervised training loop: SGD with momentum and weight decay, multi-step or cosine LR.

Used to train backdoored models (every attack), clean reference models, and by defenses that
fine-tune. Batches come from the resident uint8 tensors (`trials.data.pipeline`); an attack may
transform each batch (`batch_hook`, e.g. WaNet's noise mode) and restrict training to some
parameters (Trojaning retrains only the layers after its chosen layer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.data.pipeline import Augment, batch_indices, to_float
from trials.device import autocast, prepare_input
from trials.params import param

BatchHook = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainRecipe:
    """How a classifier is trained. Defaults: the DHBE paper's appendix recipe (docs/evaluation.md)."""

    epochs: int = param(200, "training epochs", low=1)
    batch_size: int = param(128, "batch size", low=1)
    lr: float = param(0.1, "initial SGD learning rate", low=0.0, low_exclusive=True)
    momentum: float = param(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "SGD weight decay", low=0.0)
    schedule: Literal["multistep", "cosine", "constant"] = param("multistep", "learning-rate schedule")
    milestone_fractions: tuple[float, ...] = param(
        (0.5, 0.75), "multistep decay points as fractions of the epochs (100/150 of 200)", low=0.0, high=1.0
    )
    gamma: float = param(0.1, "multistep decay factor", low=0.0, high=1.0)
    crop_pad: int = param(4, "random-crop padding in pixels (0 = no crop)", low=0)
    flip: bool = param(True, "random horizontal flip (also needs the dataset to allow it)")
    drop_last: bool = param(True, "drop the last incomplete batch of an epoch")


def make_optimizer(params: Iterable[nn.Parameter], recipe: TrainRecipe) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


# The multistep schedule, defined once. `milestones` are always epochs (0-based: the rate drops
# from that epoch on); a parameter that holds fractions of a run is named `milestone_fractions`.


def milestone_epochs(fractions: Sequence[float], epochs: int) -> list[int]:
    """Fractions of a run of `epochs` epochs -> milestone epochs (rounded to the nearest)."""
    return sorted(round(f * epochs) for f in fractions)


def step_decay(epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """The factor on the initial rate at a (0-based) epoch: gamma per milestone reached."""
    return gamma ** sum(epoch >= m for m in milestones)


def lr_at(recipe: TrainRecipe, epoch: int) -> float:
    """The learning rate for a (0-based) epoch: the schedules as epoch-wise step functions."""
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * epoch / recipe.epochs))
    return recipe.lr * step_decay(epoch, milestone_epochs(recipe.milestone_fractions, recipe.epochs), recipe.gamma)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: TrainRecipe,
    *,
    generator: torch.Generator,
    flip_allowed: bool = True,
    amp: bool = False,
    batch_hook: BatchHook | None = None,
    poisoned_mask: torch.Tensor | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    progress: Progress | None = None,
    tag: str = "train",
) -> nn.Module:
    """Train `model` in place on uint8 `images` with cross-entropy; returns it in eval mode."""
    device = images.device
    augment = Augment(pad=recipe.crop_pad, flip=recipe.flip and flip_allowed)
    trainable = (
        list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    )
    optimizer = make_optimizer(trainable, recipe)
    for epoch in range(recipe.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, epoch)
        model.train()
        start, total_loss, seen = time.perf_counter(), torch.zeros((), device=device), 0
        for idx in batch_indices(
            len(labels),
            recipe.batch_size,
            shuffle=True,
            drop_last=recipe.drop_last,
            generator=generator,
            device=device,
        ):
            x = to_float(augment(images[idx], generator))
            y = labels[idx]
            if batch_hook is not None:
                rows = (
                    poisoned_mask[idx] if poisoned_mask is not None else torch.zeros_like(y, dtype=torch.bool)
                )
                x, y = batch_hook(x, y, rows, generator)
            with autocast(device, amp):
                loss = F.cross_entropy(model(prepare_input(x, amp)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(y)
            seen += len(y)
        if progress is not None:
            record = {
                "phase": tag,
                "epoch": epoch + 1,
                "epochs": recipe.epochs,
                "loss": float(total_loss) / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
            if evaluate is not None:
                record.update(evaluate(model))
            progress(record)
    return model.eval()
