"""BCU: Backdoor Cleansing with Unlabeled data (Pang et al., CVPR 2023).

1. Partial re-initialization: a fresh model f_R of the same architecture; every conv and linear
   weight and bias of the student gets, elementwise with probability p of its stage, f_R's value:
   W_S = m * W_T + (1 - m) * W_R, m ~ Bernoulli(1 - p), no rescaling. BN parameters and statistics
   are kept. Stages come from the model's declared stages (stem, layer1..4, head), never from
   parameter names (the official code's name matching mis-groups PreAct's `linear` and
   torchvision's `downsample.1`: docs/defenses/bcu.md#differences-from-the-official-code).
2. Distillation on unlabeled images, teacher f_T in eval mode, student in train mode:
   loss = KL(softmax(f_T(x)/T_e) || softmax(f_S(x)/T_e)), batchmean, no T^2 factor, with the rising
   temperature T_e = 1 + (T_max - 1)(e + 1)/E; SGD with cosine LR over the epochs.
Returns the student after the last epoch.

Documentation: docs/defenses/bcu.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.data.pipeline import Augment, batch_indices, to_float
from trials.defenses.base import DataBudgetParams, Defense, DefenseContext, DefenseData
from trials.defenses.registry import register_defense
from trials.device import autocast, prepare_input
from trials.models.base import init_weights
from trials.params import param


@dataclass(frozen=True)
class BCUParams(DataBudgetParams):
    ratio_stem: float = param(0.01, "re-initialized fraction of the stem's conv weights", low=0.0, high=1.0)
    ratio_layer1: float = param(0.01, "re-initialized fraction in stage 1", low=0.0, high=1.0)
    ratio_layer2: float = param(0.03, "re-initialized fraction in stage 2", low=0.0, high=1.0)
    ratio_layer3: float = param(0.09, "re-initialized fraction in stage 3", low=0.0, high=1.0)
    ratio_layer4: float = param(0.27, "re-initialized fraction in stage 4", low=0.0, high=1.0)
    ratio_head: float = param(0.10, "re-initialized fraction of the classifier (fc)", low=0.0, high=1.0)
    epochs: int = param(100, "distillation epochs over the unlabeled images", low=1)
    batch_size: int = param(256, "distillation batch size", low=1)
    lr: float = param(
        0.01, "SGD learning rate (cosine-annealed over the epochs)", low=0.0, low_exclusive=True
    )
    momentum: float = param(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "SGD weight decay", low=0.0)
    temperature_max: float = param(
        4.0, "final distillation temperature (ramps from about 1 to this)", low=1.0
    )
    crop_pad: int = param(
        4, "random-crop padding of the unlabeled images (flip where the dataset allows)", low=0
    )

    def stage_ratio(self, stage: str) -> float:
        if stage == "head":
            return self.ratio_head
        if stage == "stem":
            return self.ratio_stem
        return getattr(self, f"ratio_{stage}", None) or 0.0


def stage_ratios(model: nn.Module, params: BCUParams) -> dict[str, float]:
    """Stage name -> ratio; models with 3 stages (WRN) use layer1..3, VGG's stages are named alike."""
    return {stage: params.stage_ratio(stage) for stage in model.stages()}


@torch.no_grad()
def partial_reinit(
    student: nn.Module, ratios: dict[str, float], generator: torch.Generator
) -> dict[str, float]:
    """Mix each conv/linear tensor elementwise with a freshly initialized copy; returns the fraction
    of elements replaced per stage."""
    fresh = copy.deepcopy(student)
    for module in fresh.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    init_weights(fresh)
    fresh_stages = fresh.stages()
    replaced: dict[str, float] = {}
    for stage, module in student.stages().items():
        p = ratios[stage]
        counts = [0, 0]
        fresh_modules = dict(fresh_stages[stage].named_modules())
        for name, layer in module.named_modules():
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue  # BN (including shortcut BN) keeps its parameters and statistics
            for tensor_name in ("weight", "bias"):
                w = getattr(layer, tensor_name)
                if w is None:
                    continue
                w_fresh = getattr(fresh_modules[name], tensor_name)
                reinit = torch.rand(w.shape, generator=generator, device=generator.device) < p
                reinit = reinit.to(w.device)
                w.copy_(torch.where(reinit, w_fresh, w))
                counts[0] += int(reinit.sum())
                counts[1] += reinit.numel()
        replaced[stage] = counts[0] / max(counts[1], 1)
    return replaced


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) at temperature T, batchmean, without the T^2 factor (code-faithful)."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
    )


@register_defense("bcu")
class BCU(Defense):
    Params = BCUParams
    data_kind = "unlabeled"
    precision = "fp32"  # distillation between nearly equal teacher and student logits

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        assert data is not None and data.images is not None
        p = self.params
        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # f_T
        student = model  # f_S, re-initialized in part below
        replaced = partial_reinit(student, stage_ratios(student, p), ctx.cpu_generator())
        ctx.report({"step": "reinit", **{f"reinit_{k}": round(v, 4) for k, v in replaced.items()}}, student)

        optimizer = torch.optim.SGD(
            student.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=p.epochs)
        augment = Augment(pad=p.crop_pad, flip=data.flip)
        images = data.images
        for epoch in range(p.epochs):
            temperature = 1 + (p.temperature_max - 1) * (epoch + 1) / p.epochs  # T_e rises to T_max
            student.train()
            total, seen = torch.zeros((), device=images.device), 0
            for idx in batch_indices(
                len(images),
                p.batch_size,
                shuffle=True,
                drop_last=False,
                generator=ctx.generator,
                device=images.device,
            ):
                x = prepare_input(to_float(augment(images[idx], ctx.generator)), ctx.amp)
                with autocast(ctx.device, ctx.amp):
                    with torch.no_grad():
                        t = teacher(x)
                    loss = distillation_loss(student(x).float(), t.float(), temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(idx)  # summed on the device: no host sync per batch
                seen += len(idx)
            schedule.step()
            ctx.report(
                {
                    "epoch": epoch + 1,
                    "epochs": p.epochs,
                    "loss": float(total) / max(seen, 1),
                    "temperature": round(temperature, 3),
                },
                student,
            )
        return student.eval()
