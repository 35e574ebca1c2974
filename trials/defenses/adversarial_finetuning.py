"""Adversarial fine-tuning, the step shared by PBE and AFT (Mu et al., CVPR 2023; docs/defenses/pbe.md).

Per batch: augment on the device as the code's kornia pipeline does (`augmentation` "official"): one
coin with p 0.8 decides whether the whole batch is randomly cropped (padding 5, offsets per image),
one coin with p 0.5 whether the batch goes through the rotation (within +-10 degrees), which then
turns each image with p 0.5 (kornia's own default), so an image is rotated a quarter of the time;
horizontal flip per image with p 0.5 where the dataset allows. "per_sample" (the platform's earlier
scheme) draws each image's own crop (0.8) and rotation (0.5) coins. If the batch is adversarial,
replace it by untargeted PGD examples against the batch labels (model in eval mode for the attack;
eps 6/255, 7 steps of eps/5, no random start, no clamping); then one SGD step on cross-entropy with
the model in train mode. The learning rate is constant (the code creates a scheduler and never
steps it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.adversarial import pgd
from trials.data.pipeline import batch_indices, random_crop, random_flip, random_rotate, to_float
from trials.defenses.base import DefenseContext
from trials.device import autocast, prepare_input
from trials.params import param

AUGMENTATIONS = ("official", "per_sample")


@dataclass(frozen=True)
class AdversarialFinetuneParams:
    eps: float = param(6 / 255, "PGD L-inf radius in pixel units (code: 6/255)", low=0.0)
    pgd_steps: int = param(7, "PGD iterations", low=1)
    step_fraction: float = param(
        0.2, "PGD step size as a fraction of eps (code: eps/5)", low=0.0, low_exclusive=True
    )
    lr: float = param(1e-3, "SGD learning rate, constant", low=0.0, low_exclusive=True)
    momentum: float = param(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "SGD weight decay", low=0.0)
    batch_size: int = param(128, "fine-tuning batch size", low=1)
    crop_pad: int = param(5, "random-crop padding (applied with probability 0.8)", low=0)
    rotation: float = param(10.0, "random rotation range in degrees (applied with probability 0.5)", low=0.0)
    augmentation: str = param(
        "official",
        "official: crop coin p 0.8 and rotation gate p 0.5 per batch, then rotation p 0.5 per image "
        "(PBE: pool batches in index order), as the code; per_sample: each image draws crop p 0.8 "
        "and rotation p 0.5 (PBE: shuffled pool batches)",
        choices=AUGMENTATIONS,
    )


def make_optimizer(model: nn.Module, p: AdversarialFinetuneParams) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)


def augment(
    x: torch.Tensor, p: AdversarialFinetuneParams, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    cropped = random_crop(x, p.crop_pad, generator)
    if p.augmentation == "per_sample":
        keep = torch.rand(len(x), device=x.device, generator=generator) < 0.8
        x = torch.where(keep[:, None, None, None], cropped, x)
        x = random_rotate(x, p.rotation, 0.5, generator)
    else:
        # the code's ProbTransform: one coin per batch, kept on the device (no host sync per batch)
        coins = torch.rand(2, device=x.device, generator=generator)
        x = torch.where(coins[0] < 0.8, cropped, x)
        x = torch.where(coins[1] < 0.5, random_rotate(x, p.rotation, 0.5, generator), x)
    return random_flip(x, generator) if flip else x


def finetune_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: AdversarialFinetuneParams,
    ctx: DefenseContext,
    flip: bool,
    adversarial: Callable[[int], bool],
    shuffle: bool = True,
) -> dict[str, float]:
    """One pass over (images, labels), reshuffled or in their order (`shuffle`); `adversarial(b)`
    says whether batch b is attacked with PGD."""
    # loss and accuracy are summed on the device: no host sync per batch
    total_loss, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    seen, attacked = 0, 0
    for b, idx in enumerate(
        batch_indices(
            len(images),
            p.batch_size,
            shuffle=shuffle,
            drop_last=False,
            generator=ctx.generator,
            device=images.device,
        )
    ):
        x = augment(to_float(images[idx]), p, flip, ctx.generator)
        y = labels[idx]
        if adversarial(b):
            x = pgd(model, x, y, p.eps, p.eps * p.step_fraction, p.pgd_steps)
            attacked += len(idx)
        model.train()
        with autocast(ctx.device, ctx.amp):
            logits = model(prepare_input(x, ctx.amp))
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
    return {
        "loss": float(total_loss) / max(seen, 1),
        "train_acc": float(correct) / max(seen, 1),
        "adversarial": attacked,
    }
