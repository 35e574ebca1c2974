"""ACC / ASR (three definitions) / RA / amplified ASR / DER against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.attacks import make_attack
from trials.device import allow_tf32, exact_fp32
from trials.metrics import (
    METRICS,
    Predictions,
    activation_shift,
    build_eval_set,
    compare_halves,
    defense_effectiveness_rating,
    defense_metric_keys,
    evaluate,
    logits,
    metric_keys,
    predict,
    with_backdoored,
)
from trials.models import build_model

SCALE = 20  # a class c is written into a pixel as the uint8 value 20c


class Lookup(nn.Module):
    """Predicts the class written in pixel (2,4), or in pixel (2,5) when the trigger pixel (7,7) is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        triggered = x[:, 0, 7, 7] > 0.99
        value = torch.where(triggered, x[:, 0, 2, 5], x[:, 0, 2, 4])
        return F.one_hot(torch.round(value * 255 / SCALE).long(), 10).float()


class BackdooredLookup(nn.Module):
    """Another model (the backdoored one, for asr_paper): predicts the class written in pixel (2,6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(torch.round(x[:, 0, 2, 6] * 255 / SCALE).long(), 10).float()


# columns: true label y, clean prediction, prediction with the trigger, the backdoored model's clean
# prediction; target t = 0
CASES = [
    (0, 0, 0, 0),  # target class: excluded from ASR
    (1, 1, 0, 1),  # correct, backdoor hit
    (2, 2, 2, 2),  # correct, trigger ignored (robust)
    (1, 2, 0, 1),  # wrong on clean (the backdoored model is right), backdoor hit
    (2, 2, 1, 0),  # correct (the backdoored model is wrong), trigger changes the prediction, not to t
    (0, 1, 1, 0),  # target class, wrong on clean
]


@pytest.fixture()
def eval_set():
    x = torch.zeros(len(CASES), 3, 8, 8, dtype=torch.uint8)
    for i, (_, clean, trig, backdoored) in enumerate(CASES):
        x[i, :, 2, 4] = SCALE * clean
        x[i, :, 2, 5] = SCALE * trig
        x[i, :, 2, 6] = SCALE * backdoored
    y = torch.tensor([c[0] for c in CASES])
    attack = make_attack("badnets", {"pattern": "white", "size": 1}, 10, (3, 8, 8), 0)
    return build_eval_set(x, y, attack)


def test_metrics_by_hand(eval_set):
    m = evaluate(Lookup(), eval_set)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["asr"] == pytest.approx(2 / 4)  # attacked = the 4 non-target images; hits: rows 1 and 3
    assert m["asr_cond"] == pytest.approx(1 / 3)  # among rows 1, 2, 4 (correct on clean) only row 1 hits
    assert m["ra"] == pytest.approx(1 / 4)  # row 2 keeps its true label
    for preset in ("x4", "x5", "x9"):  # every amplified layout covers the bottom-right pixel too
        assert m[f"asr_{preset}"] == pytest.approx(2 / 4)
        assert m[f"asr_{preset}_cond"] == pytest.approx(1 / 3)
    # the evaluated model is the backdoored one: the paper's conditioning is the code's
    assert m["asr_paper"] == m["asr_cond"]


def test_asr_paper_conditions_on_the_backdoored_model(eval_set):
    ev = with_backdoored(eval_set, BackdooredLookup())
    assert ev.backdoored_clean.tolist() == [c[3] for c in CASES]
    m = evaluate(Lookup(), ev)
    # the backdoored model is right on rows 1, 2, 3 (attacked); the evaluated model hits rows 1 and 3
    assert m["asr_paper"] == pytest.approx(2 / 3)
    assert m["asr_cond"] == pytest.approx(1 / 3)  # unchanged: conditioned on the evaluated model
    assert m["asr"] == pytest.approx(2 / 4)
    assert with_backdoored(eval_set, None) is eval_set


def test_amplified_conditional_asr_by_hand():
    # 6 images, target 0; attacked: rows 1-4; the evaluated model is right on rows 1, 2, 4
    y = torch.tensor([0, 1, 2, 1, 2, 0])
    p = Predictions(
        y=y,
        clean=torch.tensor([0, 1, 2, 2, 2, 1]),
        attacked=y != 0,
        triggered=torch.tensor([0, 2, 0, 1]),
        target=torch.zeros(4, dtype=torch.long),
        amplified={
            "x4": torch.tensor([0, 0, 0, 1]),  # hits rows 1, 2, 3
            "x5": torch.tensor([1, 1, 1, 1]),  # no hit
            "x9": torch.tensor([0, 0, 0, 0]),  # hits every row
        },
    )
    m = {name: fn(p) for name, fn in METRICS.in_registration_order()}
    assert m["asr_x4"] == pytest.approx(3 / 4) and m["asr_x4_cond"] == pytest.approx(2 / 3)  # rows 1, 2
    assert m["asr_x5"] == 0 and m["asr_x5_cond"] == 0
    assert m["asr_x9"] == 1 and m["asr_x9_cond"] == 1
    assert m["asr"] == pytest.approx(2 / 4) and m["asr_cond"] == pytest.approx(1 / 3)
    assert m["asr_paper"] == m["asr_cond"]  # no backdoored predictions: the evaluated model's


def test_der_by_hand():
    der = defense_effectiveness_rating
    # ASR 1.0 -> 0.1 (+0.9), ACC 0.9 -> 0.85 (-0.05): (0.9 - 0.05 + 1) / 2
    assert der({"acc": 0.9, "asr": 1.0}, {"acc": 0.85, "asr": 0.1}) == pytest.approx(0.925)
    # both rise: neither term counts, (0 - 0 + 1) / 2
    assert der({"acc": 0.8, "asr": 0.2}, {"acc": 0.9, "asr": 0.5}) == pytest.approx(0.5)
    # nothing changes: 0.5; perfect erasure at no cost: 1; ACC lost, backdoor kept: 0
    assert der({"acc": 0.9, "asr": 0.9}, {"acc": 0.9, "asr": 0.9}) == pytest.approx(0.5)
    assert der({"acc": 0.9, "asr": 1.0}, {"acc": 0.9, "asr": 0.0}) == pytest.approx(1.0)
    assert der({"acc": 1.0, "asr": 1.0}, {"acc": 0.0, "asr": 1.0}) == pytest.approx(0.0)
    assert der({"acc": 0.9, "asr": None}, {"acc": 0.9, "asr": None}) is None  # no trigger


def test_compare_halves_adds_der_to_both_halves_only():
    before = {"acc": 0.9, "asr": 1.0, "val": {"acc": 0.8, "asr": 0.6}}
    after = {"acc": 0.85, "asr": 0.1, "val": {"acc": 0.9, "asr": 0.7}}
    out = compare_halves(before, after)
    assert out["der"] == pytest.approx(0.925)
    assert out["val"]["der"] == pytest.approx(0.5)
    assert "der" not in before and "der" not in before["val"]
    assert defense_metric_keys() == (*metric_keys(), "der")


def test_eval_set_built_once_as_uint8(eval_set):
    assert eval_set.x_trig.dtype == torch.uint8 and len(eval_set.x_trig) == 4
    assert torch.all(eval_set.x_trig[:, :, 7, 7] == 255)
    assert set(eval_set.amplified) == {"x4", "x5", "x9"}
    assert torch.all(eval_set.amplified["x9"][:, :, 0, 0] == 255)


def test_non_patch_triggers_have_no_amplified_metrics():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3])
    ev = build_eval_set(x, y, make_attack("blended", {}, 10, (3, 8, 8), 0))
    m = evaluate(Lookup(), ev)
    assert m["asr_x4"] is None and m["asr_x9"] is None and m["asr"] is not None


def test_activation_shift_zero_without_change_and_positive_with_trigger():
    torch.manual_seed(0)
    model = build_model("mini_resnet", 10, 32, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    same = activation_shift(model, x, x)
    assert set(same) == {*model.stage_names, "penultimate", "logits"}
    assert all(v == 0 for v in same.values())
    trig = x.clone()
    trig[:, :, -3:, -3:] = 255
    shifted = activation_shift(model, x, trig)
    assert shifted["stem"] > 0 and shifted["penultimate"] > 0


class RoundingSensitive(nn.Module):
    """Logits s and s (1 + 2^-10), s = 1 + the bottom-right pixel: class 1 in float32, a tie (read as
    class 0, the target) once bf16 (8 significant bits) rounds the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [1.0 + 2**-10]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(1 + x[:, :1, -1, -1])


def test_evaluation_is_float32_even_inside_autocast():
    """Issue 12: ACC, ASR and every metric in float32, whatever precision a trial trains in: inside
    an active bf16 autocast region (the CPU has one) evaluation still gives the float32 result."""
    model = RoundingSensitive()
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    y = torch.ones(4, dtype=torch.long)
    ev = build_eval_set(x, y, make_attack("badnets", {"pattern": "white", "size": 1}, 10, (3, 8, 8), 0))
    reference = model(x.float() / 255)
    fp32 = evaluate(model, ev)
    assert reference.dtype == torch.float32 and fp32["acc"] == 1.0 and fp32["asr"] == 0.0
    real = build_model("mini_resnet", 10, 8, (0.5,) * 3, (0.25,) * 3).eval()
    shift = activation_shift(real, x, ev.x_trig)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model(x.float() / 255)
        assert raw.dtype == torch.bfloat16 and raw.argmax(1).eq(0).all()  # the test has teeth
        out = logits(model, x)
        under_autocast = evaluate(model, ev)
        shift_under_autocast = activation_shift(real, x, ev.x_trig)
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    assert predict(model, x).eq(1).all()
    assert under_autocast == fp32
    assert shift_under_autocast == shift


def test_exact_fp32_turns_tf32_off_and_restores_it():
    """On CUDA, fp32 training may use TF32 (`allow_tf32`); evaluation (`exact_fp32`) does not. Only
    flags are read and set here: no GPU needed."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    saved = [f.fp32_precision for f in flags]
    cuda = torch.device("cuda")
    try:
        allow_tf32(cuda)
        assert [f.fp32_precision for f in flags[:2]] == ["tf32", "tf32"]
        during = []
        with exact_fp32(cuda):
            during = [f.fp32_precision for f in flags]
        assert during == ["ieee"] * 3
        assert [f.fp32_precision for f in flags[:2]] == ["tf32", "tf32"]
        with pytest.raises(RuntimeError), exact_fp32(cuda):
            raise RuntimeError("restored on errors too")
        assert [f.fp32_precision for f in flags[:2]] == ["tf32", "tf32"]
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.fp32_precision = value
