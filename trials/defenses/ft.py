"""FT: fine-tuning on the defender's clean labeled images (the DHBE paper's "Finetuning" baseline).

1. Take the backdoored model as it is (all layers trainable, train mode).
2. Minimize cross-entropy on the clean images with the DHBE protocol (docs/defenses/ft.md), which is
   the shared loop of trials/defenses/finetuning.py: 4 % of the training split, repeated up to
   2,000 samples per epoch; batch 64; SGD lr 0.01, momentum 0.9, weight decay 5e-4; 20 epochs; the
   learning rate x0.1 at epochs 10 and 15; random crop (padding 4) and flip where allowed.
3. Return the model after the last epoch (no checkpoint selection, as BackdoorBench's ft.py).

BackdoorBench's FT differs only in its schedule (5 % data, batch 256, 100 epochs, cosine over a
hard-coded T_max of 100); the DHBE protocol is kept because it is what the erasers are compared
with. FT is also the first phase of FP and NAD's teacher: they call the same loop.

Documentation: docs/defenses/ft.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.finetuning import FinetuneParams, epoch_index, finetune
from trials.defenses.registry import register_defense


@dataclass(frozen=True)
class FTParams(FinetuneParams):
    """The DHBE protocol's fine-tuning, unchanged (see FinetuneParams)."""


@register_defense("ft")
class FT(Defense):
    Params = FTParams
    data_kind = "clean_labeled"

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        assert data.images is not None and data.labels is not None
        p = self.params
        ctx.findings["clean_images"] = len(data)
        ctx.findings["samples_per_epoch"] = len(epoch_index(len(data), p.min_epoch_size, data.images.device))
        return finetune(model, data.images, data.labels, p, ctx, data.flip, stage="finetune")
