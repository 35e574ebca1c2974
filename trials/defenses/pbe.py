"""PBE: Progressive Backdoor Erasing (Mu et al., CVPR 2023), docs/defenses/pbe.md.

Uses the labeled, possibly poisoned training set and no clean data:

    logits_b = f_b(x) for every training image (backdoored model, eval mode, no augmentation)
    S <- a random `initial_pool` (5 %) of the training set
    for t = 0..3 (the model is never reset):
        fine-tune on S for `epochs_per_step` epochs, S in training-set index order (the code's
        unshuffled loader; shuffled with `augmentation` per_sample): at t = 0 every batch is
        adversarial (PGD against the given labels); at t >= 1 only the first
        `later_adversarial_batches` (31) batches of the first epoch are, then plain fine-tuning
        if t < 3: score_i = 0.5 + 0.5 cos(logits_b[i], f(x_i)) on every training image; S <- the
        top r_t by score (r = 20 %, 50 %, 70 %): images whose logits moved least are judged clean
    return f

For an infected model, untargeted adversarial examples drift to the backdoor target as triggered
images do; fine-tuning on them with the right labels erases the backdoor, and poisoned images, whose
prediction then moves most, fall out of the growing pool. The official script crashes after the last
step (it indexes the 3-entry schedule with t = 3) and saves nothing; here the last step only trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.defenses.adversarial_finetuning import AdversarialFinetuneParams, finetune_epoch, make_optimizer
from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.registry import register_defense
from trials.metrics import logits
from trials.params import param


@dataclass(frozen=True)
class PBEParams(AdversarialFinetuneParams):
    initial_pool: float = param(
        0.05, "fraction of the training set in the random initial pool", low=0.0, high=1.0, low_exclusive=True
    )
    pool_schedule: list[float] = param(
        [0.2, 0.5, 0.7], "pool fractions selected after steps 0, 1, 2 by similarity"
    )
    epochs_per_step: int = param(10, "fine-tuning epochs per progressive step", low=1)
    later_adversarial_batches: int = param(
        31, "adversarial batches at the start of steps >= 1 (first epoch)", low=0
    )


def similarity_scores(logits_before: torch.Tensor, logits_now: torch.Tensor) -> torch.Tensor:
    """0.5 + 0.5 cos(logits_b, logits_f) per image: 1 = unchanged direction, 0 = reversed."""
    return 0.5 + 0.5 * F.cosine_similarity(logits_before, logits_now, dim=1)


@register_defense("pbe")
class PBE(Defense):
    Params = PBEParams
    data_kind = "poisoned_train"
    precision = "fp32"  # the pool follows the cosine similarity of logits before and after fine-tuning

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        assert data is not None and data.images is not None and data.labels is not None
        p = self.params
        for r in p.pool_schedule:
            if not 0 < r <= 1:
                from trials.errors import InvalidValue

                raise InvalidValue(
                    "defense pbe: param 'pool_schedule'", p.pool_schedule, "fractions in (0, 1]"
                )
        images, labels = data.images, data.labels
        n = len(images)
        logits_b = logits(model, images)  # f_b on every training image (float32, as every `logits`)
        pool_size = max(1, int(round(p.initial_pool * n)))
        pool = torch.randperm(n, device=images.device, generator=ctx.generator)[:pool_size]
        # the code filters its dataset to the pool and loads it without shuffling: every epoch visits
        # the pool in training-set index order, so the adversarial batches of steps >= 1 are always
        # the pool's lowest indices
        official = p.augmentation == "official"
        optimizer = make_optimizer(model, p)
        steps = len(p.pool_schedule) + 1
        for t in range(steps):
            if official:
                pool = pool.sort().values
            pool_images, pool_labels = images[pool], labels[pool]  # gathered once a step, not per epoch
            for epoch in range(p.epochs_per_step):
                if t == 0:
                    adversarial = lambda b: True  # noqa: E731
                else:
                    adversarial = lambda b, e=epoch: e == 0 and b < p.later_adversarial_batches  # noqa: E731
                stats = finetune_epoch(
                    model, optimizer, pool_images, pool_labels, p, ctx, data.flip, adversarial, not official
                )
                ctx.report(
                    {"step": t, "epoch": epoch + 1, "pool": len(pool), **stats},
                    model if epoch == p.epochs_per_step - 1 else None,
                )
            if t < steps - 1:
                scores = similarity_scores(logits_b, logits(model, images))
                keep = max(1, int(round(p.pool_schedule[t] * n)))
                pool = scores.argsort(descending=True)[:keep]
        return model.eval()
