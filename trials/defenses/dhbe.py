"""DHBE: Data-free Holistic Backdoor Erasing (Yan et al., AsiaCCS 2023), code-faithful.

No data: a student S, initialized from the backdoored teacher T, is distilled from T on synthetic
images v = G(z) that a sample generator G makes adversarially (maximizing |S(v) - T(v)|), while an
adversarial patch generator Gp looks for a small patch P that changes S's output most, and S is
taught to ignore it:

    L_S  = L_kd + lam * L_br,   L_kd = |S(v) - T(v)|_1,   L_br = |S(x_pat) - sg(S(v))|_1
    L_G  = -|S(v) - T(v)|_1 + w1 TV1(v) + w2 TV2(v)
    L_Gp = -|S(v) - S(x_pat)|_1,   x_pat = norm(denorm(v) + pad(Gp(z2)))   (pixel space, no clamp)

All L1 terms are mean absolute differences of raw logits. Per iteration: `student_steps` S steps
(code 5, paper 3), one G step and one Gp step; one "epoch" is `iters_per_epoch` iterations.

Code-faithful details kept on purpose (they are part of the method):
- S stays in train mode in all three kinds of step, so its BN running statistics come from the
  synthetic and patched batches only, and S is evaluated with them.
- The clean and patched batches go through S as two separate forward passes (own BN batch stats).
- G's output is already normalized: it enters the models through `forward_normalized`, never `forward`.
- T is frozen and in eval mode; G and Gp are in train mode throughout.

The paper's variant (128 samples per iteration, 3 student steps) is `batch_size=128 student_steps=3`.
With `lam=0` the method is DFAD (the ablation; the official `DFAD_train.py`): Gp is neither built into
the losses nor trained, no patched batch is drawn and S sees 1 pass per student step, and the TV2
weight defaults to DFAD_train.py's 0 instead of DHBE_train.py's 1e-4 (`tv2_weight` left unset; an
explicit value is kept, e.g. `lam=0 tv2_weight=1e-4` isolates the regularizer alone).

Documentation: docs/defenses/dhbe.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.dhbe_generators import PatchGenerator, SampleGenerator
from trials.defenses.registry import register_defense
from trials.device import autocast, prepare_input, prepare_model
from trials.models.base import init_weights
from trials.params import param
from trials.training import milestone_epochs

DHBE_TV2_WEIGHT = 1e-4  # DHBE_train.py's --loss_weight_tvl2 default
DFAD_TV2_WEIGHT = 0.0  # DFAD_train.py's: the lam = 0 ablation's default


@dataclass(frozen=True)
class DHBEParams:
    lam: float = param(
        0.1, "lambda, weight of the backdoor regularizer L_br (0: plain DFAD, the ablation)", low=0.0
    )
    patch_size: int = param(5, "side p of the adversarial patch, pixels", low=1, high=256)
    batch_size: int = param(256, "synthetic samples (and patches) per step (code 256, paper 128)", low=2)
    student_steps: int = param(5, "student updates per generator update (code 5, paper 3)", low=1)
    epochs: int = param(300, "epochs E (an epoch is iters_per_epoch iterations, not a data pass)", low=1)
    iters_per_epoch: int = param(50, "iterations per epoch", low=1)
    lr_student: float = param(0.1, "SGD learning rate of the student", low=0.0, low_exclusive=True)
    lr_generator: float = param(
        1e-3, "Adam learning rate of the sample generator G", low=0.0, low_exclusive=True
    )
    lr_patch: float = param(1e-3, "Adam learning rate of the patch generator Gp", low=0.0, low_exclusive=True)
    momentum: float = param(0.9, "SGD momentum of the student", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "SGD weight decay of the student", low=0.0)
    milestone_fractions: tuple[float, ...] = param(
        (0.6, 0.8), "LR decay points of all three optimizers, fractions of epochs", low=0.0, high=1.0
    )
    gamma: float = param(0.1, "LR decay factor at each milestone", low=0.0, high=1.0, low_exclusive=True)
    nz: int = param(256, "latent size of G", low=1)
    nz_patch: int = param(256, "latent size of Gp", low=1)
    generator_width: int = param(64, "ngf of the sample generator G", low=1)
    patch_generator_width: int = param(64, "ngf of the patch generator Gp", low=1)
    tv1_weight: float = param(0.0, "w1, weight of the L1 total variation of G's images", low=0.0)
    tv2_weight: float | None = param(
        None,
        "w2, weight of the L2 (Frobenius-norm) total variation of G's images; None: 1e-4 (DHBE_train.py), "
        "or 0 with lam = 0 (DFAD_train.py)",
        low=0.0,
    )
    student_init: Literal["teacher", "random"] = param(
        "teacher", "student start: the backdoored weights (code) or random (DFAD)"
    )
    image_size: int | None = param(None, "image side; None: from the data description, else 32", low=1)

    def __post_init__(self) -> None:
        # an unset TV2 weight is resolved here, so the resolved spec records the weight that ran
        if self.tv2_weight is None:
            object.__setattr__(self, "tv2_weight", DHBE_TV2_WEIGHT if self.lam > 0 else DFAD_TV2_WEIGHT)


# --- the losses ------------------------------------------------------------------------------------


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over batch x classes (F.l1_loss, mean reduction), in float32."""
    return F.l1_loss(a.float(), b.float())


def _shifts(x: torch.Tensor) -> list[torch.Tensor]:
    """Differences to the right, down and along both diagonals."""
    return [
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    ]


def tv1(x: torch.Tensor) -> torch.Tensor:
    """Sum over the 4 directions of the mean absolute difference."""
    return sum(d.abs().mean() for d in _shifts(x.float()))


def tv2(x: torch.Tensor) -> torch.Tensor:
    """Sum over the 4 directions of the Frobenius norm of the whole-batch difference (not squared, not
    averaged: its scale grows with the batch size, as in the code)."""
    return sum(torch.linalg.vector_norm(d) for d in _shifts(x.float()))


# --- the defense -----------------------------------------------------------------------------------


@register_defense("dhbe")
class DHBE(Defense):
    Params = DHBEParams
    data_kind = "none"
    precision = "fp32"  # L1 of nearly equal teacher / student logits: sign gradients, zeroed by bf16 rounding

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        p: DHBEParams = self.params
        dev, amp, gen = ctx.device, ctx.amp, ctx.generator
        channels = int(model.normalize.mean.shape[1])
        if data is not None and data.image_shape is not None:
            image_size = int(data.image_shape[-1])
        else:
            image_size = p.image_size or 32
        norm = model.normalize  # x -> (x - mean) / std ; norm.inverse: z -> z * std + mean

        # T: the backdoored model, frozen, eval mode. S: initialized from T (code) or at random (DFAD).
        teacher = prepare_model(copy.deepcopy(model), dev, amp).eval()
        for w in teacher.parameters():
            w.requires_grad_(False)
        student = prepare_model(model, dev, amp)
        if p.student_init == "random":
            _reinitialize(student)

        # G and Gp, built from the trial seed (their init does not depend on the global RNG's state).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((ctx.seed + 7) % 2**63)
            G = SampleGenerator(p.nz, p.generator_width, channels, image_size)
            Gp = PatchGenerator(p.nz_patch, p.patch_generator_width, channels, p.patch_size, image_size)
        G, Gp = prepare_model(G, dev, amp), prepare_model(Gp, dev, amp)

        opt_S = torch.optim.SGD(
            student.parameters(), lr=p.lr_student, momentum=p.momentum, weight_decay=p.weight_decay
        )
        opt_G = torch.optim.Adam(G.parameters(), lr=p.lr_generator)
        opt_Gp = torch.optim.Adam(Gp.parameters(), lr=p.lr_patch)
        milestones = milestone_epochs(p.milestone_fractions, p.epochs)  # the code's [180, 240] of 300
        sched_S, sched_G, sched_Gp = (
            torch.optim.lr_scheduler.MultiStepLR(o, milestones, p.gamma) for o in (opt_S, opt_G, opt_Gp)
        )
        state = {
            "student": student,
            "G": G,
            "Gp": Gp,
            "opt_S": opt_S,
            "opt_G": opt_G,
            "opt_Gp": opt_Gp,
            "sched_S": sched_S,
            "sched_G": sched_G,
            "sched_Gp": sched_Gp,
        }
        start_epoch = ctx.load_checkpoint(state)

        def noise(n: int) -> torch.Tensor:
            return torch.randn(p.batch_size, n, generator=gen, device=dev)

        def patched(v: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
            """x_pat = norm(denorm(v) + pad(P)): the patch is added in pixel space, without clamping."""
            return prepare_input(norm(norm.inverse(v) + Gp.random_pad(patches, gen)), amp)

        with_patch = p.lam > 0
        student.train()
        G.train()
        Gp.train()
        for epoch in range(start_epoch, p.epochs):
            sums: dict[str, torch.Tensor] = {}
            for _ in range(p.iters_per_epoch):
                # (1) student steps: min_S  L_kd + lam * L_br on fresh v = G(z) and P = Gp(z2), both fixed
                for _ in range(p.student_steps):
                    with torch.no_grad(), autocast(dev, amp):
                        v = prepare_input(G(noise(p.nz)), amp)
                        t_logit = teacher.forward_normalized(v)
                        x_pat = patched(v, Gp(noise(p.nz_patch))) if with_patch else None
                    opt_S.zero_grad(set_to_none=True)
                    with autocast(dev, amp):
                        s_logit = student.forward_normalized(v)
                        loss_kd = l1(s_logit, t_logit)
                        loss_S = loss_kd
                        if x_pat is not None:  # a second, separate forward pass (own BN batch statistics)
                            loss_br = l1(student.forward_normalized(x_pat), s_logit.detach())
                            loss_S = loss_kd + p.lam * loss_br
                    loss_S.backward()
                    opt_S.step()

                # (2) sample-generator step: max_G |S(v) - T(v)|, with the image priors TV1 / TV2
                opt_G.zero_grad(set_to_none=True)
                with autocast(dev, amp):
                    v = prepare_input(G(noise(p.nz)), amp)
                    loss_adv = -l1(student.forward_normalized(v), teacher.forward_normalized(v))
                    loss_G = loss_adv
                    if p.tv1_weight:
                        loss_G = loss_G + p.tv1_weight * tv1(v)
                    if p.tv2_weight:
                        loss_G = loss_G + p.tv2_weight * tv2(v)
                loss_G.backward(inputs=list(G.parameters()))  # only G learns here
                opt_G.step()

                # (3) patch-generator step: max_Gp |S(v) - S(x_pat)| with v fixed (skipped when lam = 0)
                loss_Gp = torch.zeros((), device=dev)
                if with_patch:
                    opt_Gp.zero_grad(set_to_none=True)
                    with autocast(dev, amp):
                        with torch.no_grad():
                            v = prepare_input(G(noise(p.nz)), amp)
                            s_logit = student.forward_normalized(v)  # no gradient reaches Gp through it
                        loss_Gp = -l1(s_logit, student.forward_normalized(patched(v, Gp(noise(p.nz_patch)))))
                    loss_Gp.backward(inputs=list(Gp.parameters()))  # only Gp learns here
                    opt_Gp.step()

                # running sums stay on the device (no host sync per iteration)
                terms = {
                    "loss_S": loss_S,
                    "L_kd": loss_kd,
                    "L_br": loss_br if with_patch else loss_Gp,  # 0 without patch
                    "loss_G": loss_G,
                    "L_G_adv": loss_adv,
                    "loss_Gp": loss_Gp,
                }
                for k, value in terms.items():
                    sums[k] = sums[k] + value.detach().float() if k in sums else value.detach().float()

            for sched in (sched_S, sched_G, sched_Gp) if with_patch else (sched_S, sched_G):
                sched.step()
            record = {"epoch": epoch + 1, "epochs": p.epochs, "lr_S": opt_S.param_groups[0]["lr"]}
            record.update({k: float(s) / p.iters_per_epoch for k, s in sums.items()})
            if not all(math.isfinite(x) for x in record.values()):
                raise FloatingPointError(f"DHBE diverged at epoch {epoch + 1}: {record}")
            ctx.report(record, student)
            if ctx.checkpoint_due() or epoch + 1 == p.epochs:
                ctx.save_checkpoint(epoch + 1, state)

        return student.eval()


def _reinitialize(model: nn.Module) -> None:
    """Fresh weights and BN statistics (DFAD's random student); Normalize's mean/std are kept."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    init_weights(model)
