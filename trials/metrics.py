"""Evaluation: ACC, ASR (three definitions), RA, amplified ASR, DER and activation change.

The definitions, and the paper or code each one follows, are documented in docs/metrics.md.

With f the evaluated model, f_bd the backdoored (attacked) model, t(y) the backdoor's target for true
class y, Delta the trigger, and "attacked" the non-target test images (all images for all-to-all):

- acc       = #{f(x) = y} / N over the clean split;
- asr       = #{attacked, f(Delta(x)) = t(y)} / #attacked   (BackdoorBench, BCU, CLP);
- asr_cond  = #{attacked, f(x) = y, f(Delta(x)) = t(y)} / #{attacked, f(x) = y}   (DHBE code: the
              conditioning uses the evaluated model);
- asr_paper = #{attacked, f_bd(x) = y, f(Delta(x)) = t(y)} / #{attacked, f_bd(x) = y}   (DHBE paper:
              the conditioning uses the backdoored model, so every defense of one attacked model is
              measured on the same images; for the backdoored model itself it equals asr_cond);
- ra        = #{attacked, f(Delta(x)) = y} / #attacked   (robust accuracy);
- asr_x4, asr_x5, asr_x9: asr with the patch stamped 4, 5 or 9 times (patch triggers only, else None);
  asr_x4_cond, asr_x5_cond, asr_x9_cond: the same conditioned as asr_cond (DHBE paper Table 6).

A defense's results also hold `der` (`DEFENSE_METRICS`), which compares the defended model with the
backdoored one on the same half:
  der = [max(0, asr_before - asr_after) - max(0, acc_before - acc_after) + 1] / 2   (FT-SAM, ICCV 2023).

Triggered evaluation sets are built once per trial (`build_eval_set`) as uint8 tensors on the
device, exactly as a trigger pasted on an image file would be stored. A defense's sets also carry the
backdoored model's clean predictions (`with_backdoored`), which asr_paper conditions on.

Every metric comes from IEEE float32 forward passes (`logits`: no autocast, no TF32), whatever
precision the trial trained in (bf16 rounding must not move ACC or ASR: docs/performance.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from trials.attacks.base import Attack
from trials.data.pipeline import to_float, to_uint8
from trials.device import exact_fp32
from trials.registry import Registry

AMPLIFIED = ("x4", "x5", "x9")


@dataclass
class Predictions:
    """What the metrics are computed from, for one test half (the evaluated model's predictions, and
    the backdoored model's clean predictions where the evaluated model is another one)."""

    y: torch.Tensor  # true labels of every image
    clean: torch.Tensor  # f(x) for every image
    attacked: torch.Tensor  # bool: the images that count for ASR (non-target ones)
    triggered: torch.Tensor | None  # f(Delta(x)) for the attacked images; None without a trigger
    target: torch.Tensor  # t(y) for the attacked images
    amplified: dict[str, torch.Tensor] = field(default_factory=dict)  # preset -> f(Delta_k(x))
    # f_bd(x) for every image: the backdoored model's clean predictions; None when f is f_bd itself
    backdoored_clean: torch.Tensor | None = None


Metric = Callable[[Predictions], "float | None"]
# Every evaluation metric, in the order tables show them: one definition each (a function of the
# predictions, registered here or by a plugin), which flows to metrics.json, MLflow, the sweep's
# Parquet table and its summaries.
METRICS: Registry[Metric] = Registry("metric")
register_metric = METRICS.register


def metric_keys() -> tuple[str, ...]:
    return tuple(name for name, _ in METRICS.in_registration_order())


def _frac(num: torch.Tensor, den: torch.Tensor | int) -> float:
    den = int(den)
    return float(num) / den if den else 0.0


@register_metric("acc")
def clean_accuracy(p: Predictions) -> float:
    """#{f(x) = y} / N"""
    return _frac((p.clean == p.y).sum(), len(p.y))


@register_metric("asr")
def attack_success_rate(p: Predictions) -> float | None:
    """#{attacked, f(Delta(x)) = t(y)} / #attacked (BackdoorBench, BCU, CLP)"""
    if p.triggered is None:
        return None
    return _frac((p.triggered == p.target).sum(), len(p.target))


def _conditional_asr(p: Predictions, triggered: torch.Tensor, clean: torch.Tensor) -> float:
    """#{attacked, clean(x) = y, triggered = t(y)} / #{attacked, clean(x) = y}"""
    correct = clean[p.attacked] == p.y[p.attacked]
    return _frac(((triggered == p.target) & correct).sum(), correct.sum())


@register_metric("asr_cond")
def conditional_attack_success_rate(p: Predictions) -> float | None:
    """ASR over the attacked images the evaluated model classifies correctly when clean (DHBE code)"""
    if p.triggered is None:
        return None
    return _conditional_asr(p, p.triggered, p.clean)


@register_metric("asr_paper")
def paper_attack_success_rate(p: Predictions) -> float | None:
    """ASR over the attacked images the backdoored model classifies correctly when clean (DHBE paper)"""
    if p.triggered is None:
        return None
    return _conditional_asr(p, p.triggered, p.clean if p.backdoored_clean is None else p.backdoored_clean)


@register_metric("ra")
def robust_accuracy(p: Predictions) -> float | None:
    """#{attacked, f(Delta(x)) = y} / #attacked"""
    if p.triggered is None:
        return None
    return _frac((p.triggered == p.y[p.attacked]).sum(), len(p.target))


def _amplified_asr(preset: str) -> Metric:
    def metric(p: Predictions) -> float | None:
        if p.triggered is None or preset not in p.amplified:
            return None
        return _frac((p.amplified[preset] == p.target).sum(), len(p.target))

    metric.__doc__ = f"asr with the patch stamped at the {preset} positions (patch triggers only)"
    return metric


def _amplified_conditional_asr(preset: str) -> Metric:
    def metric(p: Predictions) -> float | None:
        if p.triggered is None or preset not in p.amplified:
            return None
        return _conditional_asr(p, p.amplified[preset], p.clean)

    metric.__doc__ = f"asr_cond with the patch stamped at the {preset} positions (patch triggers only)"
    return metric


for _preset in AMPLIFIED:
    register_metric(f"asr_{_preset}")(_amplified_asr(_preset))
for _preset in AMPLIFIED:
    register_metric(f"asr_{_preset}_cond")(_amplified_conditional_asr(_preset))


# --- metrics of a defense: the defended model against the backdoored one ---------------------------

Comparison = Callable[[Mapping[str, Any], Mapping[str, Any]], "float | None"]
# Metrics that only a defense's result has: functions of the backdoored model's metrics ("before")
# and the defended model's ("after") on the same test half. `compare_halves` adds them where a
# defense's metrics are assembled (trials.run.defense); `defense_metric_keys` is what flows to
# metrics.json, MLflow, the Parquet table and the objectives a sweep may name.
DEFENSE_METRICS: Registry[Comparison] = Registry("defense metric")
register_defense_metric = DEFENSE_METRICS.register


def defense_metric_keys() -> tuple[str, ...]:
    """Every metric of a defense's result, in table order: the registered metrics, then the comparisons."""
    return (*metric_keys(), *(name for name, _ in DEFENSE_METRICS.in_registration_order()))


def metric_descriptions() -> dict[str, str]:
    """Every metric's definition in one line (its function's docstring), for tables to say what a
    column is."""
    found = [*METRICS.in_registration_order(), *DEFENSE_METRICS.in_registration_order()]
    return {name: " ".join((fn.__doc__ or "").split()) for name, fn in found}


@register_defense_metric("der")
def defense_effectiveness_rating(before: Mapping[str, Any], after: Mapping[str, Any]) -> float | None:
    """[max(0, asr_before - asr_after) - max(0, acc_before - acc_after) + 1] / 2 (FT-SAM, ICCV 2023),
    with `asr` (all attacked images); None without a trigger"""
    values = (before.get("acc"), after.get("acc"), before.get("asr"), after.get("asr"))
    if any(v is None for v in values):
        return None
    acc_before, acc_after, asr_before, asr_after = values
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


def compare_halves(before: Mapping[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`after` (the defended model's `evaluate_halves`) with every defense metric added against
    `before` (the backdoored model's, same sets): the report half at the top, the validation half
    under "val". Returns `after`."""
    for name, compare in DEFENSE_METRICS.in_registration_order():
        after[name] = compare(before, after)
        after["val"][name] = compare(before["val"], after["val"])
    return after


@dataclass
class EvalSet:
    """One test half with its triggered versions, on the device."""

    x: torch.Tensor  # uint8 clean images
    y: torch.Tensor
    attacked: torch.Tensor  # bool mask of images that count for ASR
    x_trig: torch.Tensor  # uint8 triggered versions of x[attacked]
    y_target: torch.Tensor  # backdoor target for each of them
    amplified: dict[str, torch.Tensor] = field(default_factory=dict)  # preset -> uint8 triggered x[attacked]
    backdoored_clean: torch.Tensor | None = None  # the backdoored model's predictions on x (asr_paper)


def build_eval_set(
    x: torch.Tensor, y: torch.Tensor, attack: Attack | None, batch_size: int = 1024
) -> EvalSet:
    if attack is None:
        empty = x[:0]
        return EvalSet(x, y, torch.zeros_like(y, dtype=torch.bool), empty, y[:0])
    attacked = attack.attacked_mask(y)
    xs, ys = x[attacked], y[attacked]

    def stamp(fn) -> torch.Tensor:
        parts = [to_uint8(fn(to_float(xs[i : i + batch_size]))) for i in range(0, len(xs), batch_size)]
        return torch.cat(parts) if parts else xs

    amplified = {}
    if attack.patch_trigger:
        amplified = {p: stamp(lambda b, p=p: attack.apply_amplified(b, p)) for p in AMPLIFIED}
    return EvalSet(x, y, attacked, stamp(attack.apply), attack.target_labels(ys), amplified)


def with_backdoored(ev: EvalSet, backdoored: nn.Module | None) -> EvalSet:
    """`ev` with the backdoored model's clean predictions, for evaluating any other model (a defended
    or a clean one) against it: asr_paper conditions on them. With None, `ev` unchanged (the
    evaluated model is the backdoored one)."""
    if backdoored is None:
        return ev
    return dataclasses.replace(ev, backdoored_clean=predict(backdoored, ev.x))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Float32 logits for uint8 or float images, in eval mode (the caller's mode is restored).

    Always IEEE float32 (`exact_fp32`: no autocast even inside a caller's autocast region, no TF32):
    ACC, ASR and every metric are computed from these, whatever precision the trial trains in."""
    was_training = model.training
    model.eval()
    out = []
    with exact_fp32(x.device):
        for i in range(0, len(x), batch_size):
            out.append(model(to_float(x[i : i + batch_size])).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels for uint8 or float images, in eval mode (the caller's mode is restored)."""
    if not len(x):
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return logits(model, x, batch_size).argmax(1)


def evaluate(model: nn.Module, ev: EvalSet) -> dict[str, float | None]:
    """Every registered metric of `model` on one test half (in float32: `logits`)."""
    has_trigger = bool(len(ev.x_trig))
    p = Predictions(
        y=ev.y,
        clean=predict(model, ev.x),
        attacked=ev.attacked,
        triggered=predict(model, ev.x_trig) if has_trigger else None,
        target=ev.y_target,
        amplified={k: predict(model, v) for k, v in ev.amplified.items()} if has_trigger else {},
        backdoored_clean=ev.backdoored_clean,
    )
    return {name: metric(p) for name, metric in METRICS.in_registration_order()}


@torch.no_grad()
def activation_shift(model, x: torch.Tensor, x_trig: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Relative change of every stage's output, the penultimate features and the logits when the
    trigger is added: D_l = mean_i ||h_l(Delta x_i) - h_l(x_i)|| / (||h_l(x_i)|| + 1e-8), in float32."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(x_trig), batch_size):
        with exact_fp32(x.device):
            clean = model.stage_outputs(to_float(x[i : i + batch_size]))
            trig = model.stage_outputs(to_float(x_trig[i : i + batch_size]))
        for name in clean:
            a, b = clean[name].flatten(1).float(), trig[name].flatten(1).float()
            rel = (b - a).norm(dim=1) / (a.norm(dim=1) + 1e-8)
            sums[name] = sums.get(name, 0.0) + float(rel.sum())
        n += len(x_trig[i : i + batch_size])
    model.train(was_training)
    return {name: total / n for name, total in sums.items()} if n else {}


def penultimate_shift(model, ev: EvalSet) -> float | None:
    """The relative change of the penultimate features between clean and triggered inputs."""
    if not len(ev.x_trig):
        return None
    return activation_shift(model, ev.x[ev.attacked], ev.x_trig)["penultimate"]


def evaluate_halves(model: nn.Module, report_set: EvalSet, val_set: EvalSet) -> dict[str, Any]:
    """What a trial records: every metric on the report half at the top (with the penultimate
    shift), the same on the validation half under "val"."""
    out: dict[str, Any] = dict(evaluate(model, report_set))
    out["penultimate_shift"] = penultimate_shift(model, report_set)
    out["val"] = dict(evaluate(model, val_set))
    return out
