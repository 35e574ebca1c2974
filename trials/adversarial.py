"""Projected gradient descent in pixel space, shared by the defenses that fine-tune adversarially.

Untargeted L-infinity PGD on cross-entropy with the given labels, as in PBE/AFT's code
(docs/defenses/pbe.md, "Algorithm"): sign-gradient ascent with step `alpha`, projection onto the
eps-ball around x, no random start unless asked, and no clamping to [0, 1] unless asked (the PBE
code does not clamp).
The model is put in eval mode for the attack and restored to its previous mode afterwards.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    random_start: bool = False,
    clamp: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = (
            x_adv + (torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype) * 2 - 1) * eps
        )
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = x + (x_adv - x).clamp(-eps, eps)
        if clamp:
            x_adv = x_adv.clamp(0, 1)
    model.train(was_training)
    return x_adv.detach()
