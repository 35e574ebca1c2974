"""Evaluation: ACC, ASR (both definitions), RA, amplified ASR, and activation change (algorithms.md 7).

With f the evaluated model, t(y) the backdoor's target for true class y, Delta the trigger, and
"attacked" the non-target test images (all images for all-to-all):

- acc      = #{f(x) = y} / N over the clean split;
- asr      = #{attacked, f(Delta(x)) = t(y)} / #attacked   (BackdoorBench, BCU, CLP);
- asr_cond = #{attacked, f(x) = y, f(Delta(x)) = t(y)} / #{attacked, f(x) = y}   (DHBE code: the
             conditioning uses the evaluated model, not the backdoored one);
- ra       = #{attacked, f(Delta(x)) = y} / #attacked   (robust accuracy);
- asr_x4, asr_x5, asr_x9: asr with the patch stamped 4, 5 or 9 times (patch triggers only, else None).

Triggered evaluation sets are built once per trial (`build_eval_set`) as uint8 tensors on the
device, exactly as a trigger pasted on an image file would be stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trials.attacks.base import Attack
from trials.data.pipeline import to_float, to_uint8
from trials.device import autocast, prepare_input

METRIC_KEYS = ("acc", "asr", "asr_cond", "ra", "asr_x4", "asr_x5", "asr_x9")
AMPLIFIED = ("x4", "x5", "x9")


@dataclass
class EvalSet:
    """One test half with its triggered versions, on the device."""

    x: torch.Tensor  # uint8 clean images
    y: torch.Tensor
    attacked: torch.Tensor  # bool mask of images that count for ASR
    x_trig: torch.Tensor  # uint8 triggered versions of x[attacked]
    y_target: torch.Tensor  # backdoor target for each of them
    amplified: dict[str, torch.Tensor] = field(default_factory=dict)  # preset -> uint8 triggered x[attacked]


def build_eval_set(
    x: torch.Tensor, y: torch.Tensor, attack: Attack | None, batch_size: int = 1024
) -> EvalSet:
    if attack is None:
        empty = x[:0]
        return EvalSet(x, y, torch.zeros_like(y, dtype=torch.bool), empty, y[:0])
    attacked = attack.attacked_mask(y)
    xs, ys = x[attacked], y[attacked]

    def stamp(fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
        parts = [to_uint8(fn(to_float(xs[i : i + batch_size]))) for i in range(0, len(xs), batch_size)]
        return torch.cat(parts) if parts else xs

    amplified = {}
    if attack.patch_trigger:
        amplified = {p: stamp(lambda b, p=p: attack.apply_amplified(b, p)) for p in AMPLIFIED}
    return EvalSet(x, y, attacked, stamp(attack.apply), attack.target_labels(ys), amplified)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, fast: bool = False) -> torch.Tensor:
    """Float logits for uint8 or float images, in eval mode (the caller's mode is restored)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        batch = prepare_input(to_float(x[i : i + batch_size]), fast)
        with autocast(batch.device, fast):
            out.append(model(batch).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, fast: bool = False) -> torch.Tensor:
    """Predicted labels for uint8 or float images, in eval mode (the caller's mode is restored)."""
    if not len(x):
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return logits(model, x, batch_size, fast).argmax(1)


def _frac(num: torch.Tensor, den: torch.Tensor | int) -> float:
    den = int(den)
    return float(num) / den if den else 0.0


def evaluate(model: nn.Module, ev: EvalSet, fast: bool = False) -> dict[str, float | None]:
    clean_pred = predict(model, ev.x, fast=fast)
    result: dict[str, float | None] = {"acc": _frac((clean_pred == ev.y).sum(), len(ev.y))}
    if not len(ev.x_trig):
        result.update({k: None for k in METRIC_KEYS[1:]})
        return result
    y_true = ev.y[ev.attacked]
    correct_clean = clean_pred[ev.attacked] == y_true
    trig_pred = predict(model, ev.x_trig, fast=fast)
    hit = trig_pred == ev.y_target
    result["asr"] = _frac(hit.sum(), len(hit))
    result["asr_cond"] = _frac((hit & correct_clean).sum(), correct_clean.sum())
    result["ra"] = _frac((trig_pred == y_true).sum(), len(hit))
    for preset in AMPLIFIED:
        if preset in ev.amplified:
            amp_pred = predict(model, ev.amplified[preset], fast=fast)
            result[f"asr_{preset}"] = _frac((amp_pred == ev.y_target).sum(), len(hit))
        else:
            result[f"asr_{preset}"] = None
    return result


@torch.no_grad()
def activation_shift(model, x: torch.Tensor, x_trig: torch.Tensor, batch_size: int = 512) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Relative change of every stage's output, the penultimate features and the logits when the
    trigger is added: D_l = mean_i ||h_l(Delta x_i) - h_l(x_i)|| / (||h_l(x_i)|| + 1e-8)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(x_trig), batch_size):
        clean = model.stage_outputs(to_float(x[i : i + batch_size]))
        trig = model.stage_outputs(to_float(x_trig[i : i + batch_size]))
        for name in clean:
            a, b = clean[name].flatten(1).float(), trig[name].flatten(1).float()
            rel = (b - a).norm(dim=1) / (a.norm(dim=1) + 1e-8)
            sums[name] = sums.get(name, 0.0) + float(rel.sum())
        n += len(x_trig[i : i + batch_size])
    model.train(was_training)
    return {name: total / n for name, total in sums.items()} if n else {}


def penultimate_shift(model, ev: EvalSet) -> float | None:  # type: ignore[no-untyped-def]
    """The relative change of the penultimate features between clean and triggered inputs."""
    if not len(ev.x_trig):
        return None
    return activation_shift(model, ev.x[ev.attacked], ev.x_trig)["penultimate"]
