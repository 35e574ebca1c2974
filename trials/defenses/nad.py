"""NAD: Neural Attention Distillation (Li et al., ICLR 2021), the DHBE paper's NAD baseline.

1. Teacher: a copy of the backdoored model fine-tuned on the defender's clean images with the
   shared loop (trials/defenses/finetuning.py) for `teacher_epochs` (BackdoorBench: 10; the NAD
   README: "5~10 epochs"), then frozen in eval mode.
2. Student: the backdoored model itself, trained with the shared loop (the DHBE protocol: 20 epochs,
   SGD lr 0.01, x0.1 at 10 and 15, batch 64, 2,000 samples an epoch) on
       CE(student(x), y) + sum_k beta_k * AT(F_s^k, F_t^k)
   over the residual stages k (DHBE: "after the four residual stages"; `model.stage_outputs`).
3. Attention map (bboylyg/NAD at.py): A(F) = sum_c |F_c|^p (p = 2), flattened over positions and
   divided by its L2 norm per image (+1e-6); AT(F_s, F_t) = mean over images and positions of
   (A(F_s) - A(F_t))^2, the teacher's map detached.
4. Return the student after the last epoch.

The betas, [500, 500, 500, 1000] for layer1..layer4: the only ResNet-18 values in a reference
implementation are BackdoorBench's (layer3 500, layer4 1000; its third term, on the 1x1 pooled
output, is identically zero), and the DHBE protocol distills after all four stages, so layer1 and
layer2 get BackdoorBench's smaller weight. Official NAD puts 5000 on the last of WRN-16-1's three
groups only (an 8x8 map). AT is a mean over positions, so the same beta pulls less on the larger
early maps (32x32 and 16x16 on CIFAR): these weights still emphasize the last stages, as both codes do.

Official-code pitfalls not reproduced:
- NAD's main.py keeps the student checkpoint by test ACC and test ASR; here the last epoch
  (BackdoorBench does the same), nothing looks at test data.
- BackdoorBench trains the student for te_epochs (10) instead of its `epochs` and runs extra
  Sequential forwards per tap, updating the student's BN statistics several times per batch; here
  one student forward per batch (stage_outputs returns the logits with the stage outputs).
- Official NAD's schedule (lr 0.1 for 2 epochs, then 0.01, nesterov, Cutout) is replaced by the
  DHBE protocol, which is what the comparison uses; the attention maps are computed in float32.

Documentation: docs/defenses/nad.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.finetuning import FinetuneParams, finetune
from trials.defenses.registry import register_defense
from trials.errors import InvalidValue
from trials.params import param

AT_EPS = 1e-6  # at.py: added to the norm before dividing


@dataclass(frozen=True)
class NADParams(FinetuneParams):
    teacher_epochs: int = param(10, "fine-tuning epochs of the teacher (BackdoorBench te_epochs)", low=0)
    betas: list[float] = param(
        [500.0, 500.0, 500.0, 1000.0],
        "attention-transfer weight after each residual stage (layer1..layerK), one per stage",
        low=0.0,
    )
    power: float = param(2.0, "p of the attention map sum_c |F_c|^p (NAD: 2)", low=0.0, low_exclusive=True)


def attention_map(feature: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """N x C x H x W -> N x (H*W): sum over channels of |F|^p, L2-normalized per image."""
    a = feature.float().abs().pow(power).sum(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + AT_EPS)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the attention maps, the teacher's detached."""
    return F.mse_loss(attention_map(student, power), attention_map(teacher.detach(), power))


def residual_stages(model: nn.Module) -> list[str]:
    return [name for name in model.stage_names if name != "stem"]


@register_defense("nad")
class NAD(Defense):
    Params = NADParams
    data_kind = "clean_labeled"

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        assert data.images is not None and data.labels is not None
        p = self.params
        stages = residual_stages(model)
        if len(p.betas) != len(stages):
            raise InvalidValue(
                "defense nad: param 'betas'",
                p.betas,
                f"one weight per residual stage of this model ({', '.join(stages)})",
            )
        weighted = [(s, b) for s, b in zip(stages, p.betas, strict=True) if b > 0]

        teacher = copy.deepcopy(model)
        finetune(
            teacher, data.images, data.labels, p, ctx, data.flip, epochs=p.teacher_epochs, stage="teacher"
        )
        teacher.eval().requires_grad_(False)

        last: dict[str, torch.Tensor] = {}  # AT per stage of the latest batch, kept on the device

        def nad_loss(
            student: nn.Module, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = student.stage_outputs(x)  # one forward: stage outputs and logits
            with torch.no_grad():
                targets = teacher.stage_outputs(x)
            loss = F.cross_entropy(outputs["logits"].float(), y)
            for stage, beta in weighted:
                at = attention_loss(outputs[stage], targets[stage], p.power)
                last[stage] = at.detach()
                loss = loss + beta * at
            return outputs["logits"], loss

        finetune(model, data.images, data.labels, p, ctx, data.flip, loss_fn=nad_loss, stage="student")
        ctx.findings.update(
            {
                "stages": stages,
                "betas": list(p.betas),
                "teacher_epochs": p.teacher_epochs,
                "at_loss_last_batch": {s: float(v) for s, v in last.items()},
            }
        )
        return model.eval()
