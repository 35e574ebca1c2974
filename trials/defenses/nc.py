"""NC: Neural Cleanse (Wang et al., S&P 2019), reverse engineering + MAD detection + unlearning.

1. Reverse engineering, for every candidate label y_t (bolunwang/backdoor `visualizer.py`): a mask
   m = tanh(m~)/(2 - eps) + 1/2 (H x W, shared over channels) and a pattern p = tanh(p~)/(2 - eps) + 1/2
   (C x H x W) stamp x' = (1 - m) * x + m * p in pixel space [0, 1] (the model normalizes inside).
   Loss = CE(f(x'), y_t) + cost * |m|_1, Adam(lr 0.1, betas 0.5 / 0.9) on (m~, p~), random initial
   m and p (the official example script). One "step" is floor(`samples_per_step` / `re_batch_size`)
   Adam updates on batches of `re_batch_size` (the script: 1,000 images in 31 batches of 32);
   accuracy and |m|_1 are averaged per step. A clean set smaller than a step is cycled, reshuffled
   every pass, so that a step means what the schedule below was written for. (On digits with 57
   clean images, steps of 4 updates gave the same mask norms and detections as steps of one
   update: docs/defenses/nc.md "Other targets, and the step schedule".)
2. Cost schedule: cost starts at 0; after `patience` successful steps (attack success >= 0.99) it
   becomes `init_cost`; afterwards `patience` successful steps in a row multiply it by
   `cost_multiplier` (2), `patience` failing steps divide it by cost_multiplier ** 1.5. The mask of
   the step with the smallest |m|_1 among successful steps is kept (the last one if none succeeds).
   Early stop: once the cost went both up and down, `early_stop_patience` steps without a smaller
   best norm (threshold 1.0: any improvement resets the count) end the search.
3. Detection (`mad_outlier_detection.py`): median and MAD = 1.4826 * median |L1 - median| of the
   masks' L1 norms; anomaly index = |L1 - median| / MAD; a label is flagged when its L1 is below the
   median and its index exceeds 2.
4. Unlearning (DHBE protocol, docs/defenses/nc.md; the NC repository ships none): the shared clean
   fine-tuning loop (trials/defenses/finetuning.py) with 20 % of every batch stamped with the
   recovered trigger of a flagged label (one drawn per image when several are flagged), true
   labels kept.

Choices and official-code pitfalls not reproduced:
- All candidate labels are optimized in one batched pass (each has its own mask, pattern, cost and
  schedule; Adam is elementwise and the model is in eval mode, so the updates are those of separate
  runs that share their image batches). A label that stopped early is dropped from the batch.
- The defender's clean held-out images are the data (the official example uses the GTSRB test set;
  BackdoorBench the whole clean training set); nothing here looks at test data.
- The recovered mask and pattern are used as optimized (BackdoorBench stamps a PNG round trip of
  them, min-max rescaled by save_image, which is not the trigger that was found).
- When no label is flagged the model is returned unchanged (NC's pipeline and BackdoorBench: the
  defender believes the model clean); `unlearn_when_undetected=True` unlearns instead with the
  trigger of the label with the smallest norm (what a comparison that always mitigates would do).

Documentation: docs/defenses/nc.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.data.pipeline import to_float
from trials.defenses.base import Defense, DefenseContext, DefenseData
from trials.defenses.finetuning import FinetuneParams, finetune
from trials.defenses.registry import register_defense
from trials.device import autocast
from trials.params import param

TANH_EPS = 1e-7  # Keras' K.epsilon(): keeps the mask strictly inside (0, 1)
MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the std for normal data


@dataclass(frozen=True)
class NCParams(FinetuneParams):
    steps: int = param(1000, "reverse-engineering steps per label (official script: 1000)", low=1)
    samples_per_step: int = param(
        1000, "images per step (official: NB_SAMPLE 1000, i.e. 31 batches of 32)", low=1
    )
    re_batch_size: int = param(32, "reverse-engineering batch size (official: 32)", low=1)
    mask_lr: float = param(0.1, "Adam learning rate of the mask and pattern", low=0.0, low_exclusive=True)
    init_cost: float = param(1e-3, "cost of |m|_1 once the schedule starts", low=0.0, low_exclusive=True)
    attack_succ_threshold: float = param(
        0.99, "a step succeeds when this fraction of stamped images goes to the label", low=0.0, high=1.0
    )
    patience: int = param(5, "steps before the cost is set, raised or lowered", low=1)
    cost_multiplier: float = param(
        2.0, "cost x this after `patience` successes, / this**1.5 after failures", low=1.0, low_exclusive=True
    )
    reset_cost_to_zero: bool = param(True, "start the cost at 0 (official script) instead of init_cost")
    early_stop: bool = param(True, "stop a label's search once its best norm stops improving")
    early_stop_threshold: float = param(
        1.0, "a step improves when best norm < this x previous best (official script: 1.0)", low=0.0
    )
    early_stop_patience: int = param(25, "steps without improvement before the early stop", low=1)
    anomaly_threshold: float = param(2.0, "labels with anomaly index above this are flagged", low=0.0)
    unlearn_ratio: float = param(
        0.2, "fraction of each fine-tuning batch stamped with a recovered trigger", low=0.0, high=1.0
    )
    unlearn_when_undetected: bool = param(
        False, "fine-tune with the smallest-norm label's trigger even if no label is flagged"
    )


@dataclass
class ReversedTriggers:
    """One mask (K x 1 x H x W) and pattern (K x C x H x W) per candidate label, in pixel space."""

    labels: list[int]
    masks: torch.Tensor
    patterns: torch.Tensor
    norms: list[float]  # L1 of each kept mask
    succeeded: list[bool]  # whether the label reached the attack-success threshold
    steps: list[int] = field(default_factory=list)  # steps run per label

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """x' = (1 - m) * x + m * p with trigger `which[i]` (an index into `labels`) on image i."""
        m, p = self.masks[which], self.patterns[which]
        return (1 - m) * x + m * p


def to_unit_interval(v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(v) / (2 - TANH_EPS) + 0.5


def from_unit_interval(u: torch.Tensor) -> torch.Tensor:
    return torch.atanh((u - 0.5) * (2 - TANH_EPS))


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no weight gradients (only the trigger is optimized); restores both on exit."""
    was_training = model.training
    flags = [q.requires_grad for q in model.parameters()]
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    try:
        yield model
    finally:
        for q, f in zip(model.parameters(), flags, strict=True):
            q.requires_grad_(f)
        model.train(was_training)


def cycled_batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Batches of `batch_size` indices from an endless stream of shuffled passes over n items (the
    official data generator's role). A batch may straddle two passes, so a set smaller than a step,
    or than a batch, is cycled whole: no image is dropped and every batch is full."""
    buffer = torch.empty(0, dtype=torch.long, device=device)
    while True:
        while len(buffer) < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, device=device, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def updates_per_step(samples_per_step: int, batch_size: int) -> int:
    """Adam updates in one step: the official MINI_BATCH = NB_SAMPLE / BATCH_SIZE (Python 2's floor
    division: 1000 / 32 -> 31), at least one."""
    return max(1, samples_per_step // batch_size)


class _CostSchedule:
    """The official per-label cost / best-mask / early-stop bookkeeping, one step at a time."""

    def __init__(self, p: NCParams) -> None:
        self.p = p
        self.cost = 0.0 if p.reset_cost_to_zero else p.init_cost
        self.set_counter = self.up_counter = self.down_counter = 0
        self.up_flag = self.down_flag = False
        self.reg_best = math.inf
        self.early_stop_reg_best = math.inf
        self.early_stop_counter = 0

    def update(self, acc: float, reg: float) -> tuple[bool, bool]:
        """After a step with mean attack success `acc` and mean |m|_1 `reg`: (new best?, stop?)."""
        p = self.p
        success = acc >= p.attack_succ_threshold
        is_best = success and reg < self.reg_best
        if is_best:
            self.reg_best = reg
        stop = False
        if p.early_stop:
            if self.reg_best < math.inf:
                if self.reg_best >= p.early_stop_threshold * self.early_stop_reg_best:
                    self.early_stop_counter += 1
                else:
                    self.early_stop_counter = 0
            self.early_stop_reg_best = min(self.reg_best, self.early_stop_reg_best)
            stop = self.up_flag and self.down_flag and self.early_stop_counter >= p.early_stop_patience
        if self.cost == 0 and success:
            self.set_counter += 1
            if self.set_counter >= p.patience:
                self.cost = p.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if success:
            self.up_counter, self.down_counter = self.up_counter + 1, 0
        else:
            self.up_counter, self.down_counter = 0, self.down_counter + 1
        if self.up_counter >= p.patience:
            self.up_counter = 0
            self.cost *= p.cost_multiplier
            self.up_flag = True
        elif self.down_counter >= p.patience:
            self.down_counter = 0
            self.cost /= p.cost_multiplier**1.5
            self.down_flag = True
        return is_best, stop


def reverse_engineer(
    model: nn.Module,
    images: torch.Tensor,
    labels: list[int],
    p: NCParams,
    generator: torch.Generator,
    *,
    amp: bool = False,
    progress: Callable[[int, dict[int, tuple[float, float]]], None] | None = None,
) -> ReversedTriggers:
    """Steps 1-2 for every label in `labels` at once, on float or uint8 `images` (the defender's)."""
    device = images.device
    k = len(labels)
    _, c, h, w = images.shape
    targets = torch.tensor(labels, device=device)
    # random initial mask and pattern, as the official example script
    mask_v = from_unit_interval(torch.rand(k, 1, h, w, device=device, generator=generator)).requires_grad_()
    pattern_v = from_unit_interval(
        torch.rand(k, c, h, w, device=device, generator=generator)
    ).requires_grad_()
    optimizer = torch.optim.Adam([mask_v, pattern_v], lr=p.mask_lr, betas=(0.5, 0.9))
    schedules = [_CostSchedule(p) for _ in labels]
    best_mask = torch.zeros(k, 1, h, w, device=device)
    best_pattern = torch.zeros(k, c, h, w, device=device)
    found = [False] * k
    steps_run = [p.steps] * k
    active = list(range(k))
    # a step is many updates even on a small clean set, as in the original: the cost schedule's
    # patience and the early stop count steps
    batches = cycled_batches(len(images), p.re_batch_size, generator, device)
    per_step = updates_per_step(p.samples_per_step, p.re_batch_size)
    with frozen(model):
        for step in range(p.steps):
            idx_active = torch.tensor(active, device=device)
            cost = torch.tensor([schedules[i].cost for i in active], device=device)
            acc_sum = torch.zeros(len(active), device=device)
            reg_sum = torch.zeros(len(active), device=device)
            for _ in range(per_step):
                x = to_float(images[next(batches)])
                mask = to_unit_interval(mask_v[idx_active])  # A x 1 x H x W
                pattern = to_unit_interval(pattern_v[idx_active])
                stamped = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]  # A x B x C x H x W
                with autocast(device, amp):
                    logits = model(stamped.flatten(0, 1)).float().view(len(active), len(x), -1)
                goal = targets[idx_active][:, None].expand(-1, len(x))
                ce = F.cross_entropy(logits.flatten(0, 1), goal.flatten(), reduction="none")
                reg = mask.abs().sum(dim=(1, 2, 3))
                # a sum of independent per-label losses: each label's gradient is its own loss's
                loss = (ce.view(len(active), -1).mean(1) + cost * reg).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                acc_sum += (logits.argmax(-1) == goal).float().mean(1).detach()
                reg_sum += reg.detach()
            accs, regs = (acc_sum / per_step).tolist(), (reg_sum / per_step).tolist()
            with torch.no_grad():
                mask_now, pattern_now = to_unit_interval(mask_v), to_unit_interval(pattern_v)
            still_active = []
            for j, i in enumerate(active):
                is_best, stop = schedules[i].update(accs[j], regs[j])
                if is_best:  # the official code keeps the mask at the end of the step
                    best_mask[i], best_pattern[i], found[i] = mask_now[i], pattern_now[i], True
                if stop:
                    steps_run[i] = step + 1
                else:
                    still_active.append(i)
            if progress is not None:
                progress(step, {labels[i]: (accs[j], regs[j]) for j, i in enumerate(active)})
            active = still_active
            if not active:
                break
        with torch.no_grad():
            mask_now, pattern_now = to_unit_interval(mask_v), to_unit_interval(pattern_v)
        for i in range(k):
            if not found[i]:  # official: the last mask when no step reached the threshold
                best_mask[i], best_pattern[i] = mask_now[i], pattern_now[i]
    norms = best_mask.abs().sum(dim=(1, 2, 3)).tolist()
    return ReversedTriggers(labels, best_mask, best_pattern, norms, found, steps_run)


def mad_anomaly(norms: list[float] | torch.Tensor, threshold: float = 2.0) -> tuple[list[float], list[int]]:
    """Step 3: (anomaly index per label, positions flagged: below the median with index > threshold)."""
    l1 = torch.as_tensor(norms, dtype=torch.float64)
    median = l1.quantile(0.5)  # = np.median (the mean of the two middle values for an even count)
    deviation = (l1 - median).abs()
    mad = MAD_CONSISTENCY * deviation.quantile(0.5)
    if mad > 0:
        index = deviation / mad
    else:  # over half the norms equal the median: any other norm is infinitely anomalous
        index = torch.where(deviation > 0, torch.inf, 0.0).double()
    flagged = [i for i in range(len(l1)) if l1[i] < median and index[i] > threshold]
    return index.tolist(), flagged


@register_defense("nc")
class NeuralCleanse(Defense):
    Params = NCParams
    data_kind = "clean_labeled"

    def run(self, model: nn.Module, data: DefenseData, ctx: DefenseContext) -> nn.Module:
        assert data is not None and data.images is not None and data.labels is not None
        p = self.params
        report_every = max(1, p.steps // 10)

        def progress(step: int, per_label: dict[int, tuple[float, float]]) -> None:
            if (step + 1) % report_every == 0:
                ctx.report(
                    {
                        "stage": "reverse",
                        "step": step + 1,
                        "steps": p.steps,
                        "active": len(per_label),
                        "mean_acc": sum(a for a, _ in per_label.values()) / len(per_label),
                    }
                )

        # the defender's clean images only; no test data in the search or the detection
        found = reverse_engineer(
            model,
            data.images,
            list(range(data.num_classes)),
            p,
            ctx.generator,
            amp=ctx.amp,
            progress=progress,
        )
        index, flagged = mad_anomaly(found.norms, p.anomaly_threshold)
        smallest = min(range(len(found.norms)), key=found.norms.__getitem__)
        ctx.findings.update(
            {
                "mask_l1": [round(v, 4) for v in found.norms],
                "anomaly_index": [round(v, 4) for v in index],
                "anomaly_index_of_min": round(index[smallest], 4),  # what the official script prints
                "flagged": [found.labels[i] for i in flagged],
                "reached_threshold": found.succeeded,
                "steps_run": found.steps,
            }
        )
        use = flagged
        if not flagged and p.unlearn_when_undetected:
            use = [smallest]
        ctx.findings["unlearned_with"] = [found.labels[i] for i in use]
        ctx.report({"stage": "detect", "flagged": ctx.findings["flagged"]}, model)
        if not use:
            return model.eval()
        which_pool = torch.tensor(use, device=data.images.device)

        def stamp_part(
            x: torch.Tensor, y: torch.Tensor, g: torch.Generator
        ) -> tuple[torch.Tensor, torch.Tensor]:
            n = int(round(p.unlearn_ratio * len(x)))
            pick = torch.randperm(len(x), device=x.device, generator=g)[:n]
            which = which_pool[torch.randint(len(use), (n,), device=x.device, generator=g)]
            x = x.clone()
            x[pick] = found.stamp(x[pick], which)
            return x, y  # true labels: the model unlearns the trigger -> label association

        return finetune(
            model, data.images, data.labels, p, ctx, data.flip, transform=stamp_part, stage="unlearn"
        )
