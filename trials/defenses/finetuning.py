"""Clean fine-tuning: the loop shared by the label-using baselines (FT, FP, NAD, NC, GDM, MCR).

The DHBE paper's protocol for them (docs/defenses/ft.md), which is what the erasers are compared with:
the defender's clean labeled images (4 % of the training split), repeated up to 2,000 samples per
epoch when fewer; batch 64; SGD lr 0.01, momentum 0.9, weight decay 5e-4; 20 epochs; the learning
rate x0.1 at epochs 10 and 15; random crop (padding 4) and horizontal flip where the dataset allows.

A defense changes the loop only through three hooks, so each reads as its paper's algorithm:
- `transform(x, y, generator) -> (x, y)` edits an augmented float batch before the step (NC and GDM
  stamp recovered triggers on part of it, keeping the true labels);
- `loss_fn(model, x, y) -> (logits, loss)` replaces plain cross-entropy (NAD adds attention transfer
  from the same forward pass);
- `after_step(model)` restores a constraint after each optimizer step (FP's pruned channels).

Documentation: docs/defenses/ft.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.data.pipeline import Augment, batch_indices, to_float
from trials.defenses.base import DataBudgetParams, DefenseContext, data_fraction_param
from trials.device import autocast, prepare_input
from trials.params import param
from trials.training import step_decay

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FinetuneParams(DataBudgetParams):
    data_fraction: float = data_fraction_param(
        0.04, "clean labeled images, as a fraction of the training split (DHBE protocol: 4 %)"
    )
    lr: float = param(0.01, "SGD learning rate", low=0.0, low_exclusive=True)
    momentum: float = param(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "SGD weight decay", low=0.0)
    batch_size: int = param(64, "fine-tuning batch size", low=1)
    epochs: int = param(20, "fine-tuning epochs", low=0)
    milestones: list[int] = param([10, 15], "epochs after which the learning rate is multiplied by 0.1")
    min_epoch_size: int = param(
        2000, "samples per epoch: a smaller clean set is repeated up to this size", low=1
    )
    crop_pad: int = param(4, "random-crop padding", low=0)


def epoch_index(n: int, min_epoch_size: int, device: torch.device) -> torch.Tensor:
    """Indices of one epoch: 0..n-1 repeated until there are at least `min_epoch_size` of them."""
    return torch.arange(n, device=device).repeat(max(1, math.ceil(min_epoch_size / n)))


def finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: FinetuneParams,
    ctx: DefenseContext,
    flip: bool,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    transform: Transform | None = None,
    loss_fn: LossFn | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    stage: str = "finetune",
) -> nn.Module:
    """Fine-tune `model` in place on (images, labels) with the protocol's schedule; returns it in eval mode.

    `epochs` and `lr` override the params (NAD's teacher, MCR's end point); every epoch is reported
    with the runner's validation ACC/ASR.
    """
    epochs = p.epochs if epochs is None else epochs
    base_lr = p.lr if lr is None else lr
    optimizer = torch.optim.SGD(
        model.parameters(), lr=base_lr, momentum=p.momentum, weight_decay=p.weight_decay
    )
    augment = Augment(pad=p.crop_pad, flip=flip)
    index = epoch_index(len(images), p.min_epoch_size, images.device)
    for epoch in range(epochs):
        lr_now = base_lr * step_decay(epoch, p.milestones, 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        model.train()
        # summed on the device: no host sync per batch
        total_loss, correct, seen = (
            torch.zeros((), device=images.device),
            torch.zeros((), device=images.device),
            0,
        )
        for batch in batch_indices(
            len(index),
            p.batch_size,
            shuffle=True,
            drop_last=False,
            generator=ctx.generator,
            device=images.device,
        ):
            idx = index[batch]
            x, y = augment(to_float(images[idx]), ctx.generator), labels[idx]
            if transform is not None:
                x, y = transform(x, y, ctx.generator)
            with autocast(ctx.device, ctx.amp):
                if loss_fn is None:
                    logits = model(prepare_input(x, ctx.amp))
                    loss = F.cross_entropy(logits.float(), y)
                else:
                    logits, loss = loss_fn(model, prepare_input(x, ctx.amp), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
        stats = {"loss": float(total_loss) / max(seen, 1), "train_acc": float(correct) / max(seen, 1)}
        ctx.report({"stage": stage, "epoch": epoch + 1, "epochs": epochs, "lr": lr_now, **stats}, model)
    return model.eval()
