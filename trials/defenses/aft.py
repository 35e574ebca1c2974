"""AFT: adversarial fine-tuning on a clean labeled set (Mu et al., CVPR 2023; docs/defenses/aft.md).

The clean set comes from the training split's held-out part (`data_fraction` / `data_count`; the
code used the whole CIFAR-10 training set, the paper a small clean set). 20 epochs, the first 3
adversarial (PGD against the true labels), the rest plain fine-tuning, constant learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from trials.defenses.adversarial_finetuning import AdversarialFinetuneParams, finetune_epoch, make_optimizer
from trials.defenses.base import DataBudgetParams, Defense, DefenseContext, DefenseData
from trials.defenses.registry import register_defense
from trials.params import param


@dataclass(frozen=True)
class AFTParams(AdversarialFinetuneParams, DataBudgetParams):
    epochs: int = param(20, "fine-tuning epochs over the clean set", low=1)
    adversarial_epochs: int = param(3, "the first epochs that are adversarial", low=0)


@register_defense("aft")
class AFT(Defense):
    Params = AFTParams
    data_kind = "clean_labeled"

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        assert data is not None and data.images is not None and data.labels is not None
        p = self.params
        optimizer = make_optimizer(model, p)
        for epoch in range(p.epochs):
            adversarial = epoch < p.adversarial_epochs
            stats = finetune_epoch(
                model, optimizer, data.images, data.labels, p, ctx, data.flip, lambda b, a=adversarial: a
            )
            ctx.report({"epoch": epoch + 1, "epochs": p.epochs, **stats}, model)
        return model.eval()
