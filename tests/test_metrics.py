"""ACC / ASR / conditional ASR / RA / amplified ASR against a hand-computed case."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.attacks import make_attack
from trials.metrics import activation_shift, build_eval_set, evaluate
from trials.models import build_model

SCALE = 20  # a class c is written into a pixel as the uint8 value 20c


class Lookup(nn.Module):
    """Predicts the class written in pixel (2,4), or in pixel (2,5) when the trigger pixel (7,7) is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        triggered = x[:, 0, 7, 7] > 0.99
        value = torch.where(triggered, x[:, 0, 2, 5], x[:, 0, 2, 4])
        return F.one_hot(torch.round(value * 255 / SCALE).long(), 10).float()


# columns: true label y, clean prediction, prediction with the trigger; target t = 0
CASES = [
    (0, 0, 0),  # target class: excluded from ASR
    (1, 1, 0),  # correct, backdoor hit
    (2, 2, 2),  # correct, trigger ignored (robust)
    (1, 2, 0),  # wrong on clean, backdoor hit
    (2, 2, 1),  # correct, trigger changes the prediction but not to the target
    (0, 1, 1),  # target class, wrong on clean
]


@pytest.fixture()
def eval_set():
    x = torch.zeros(len(CASES), 3, 8, 8, dtype=torch.uint8)
    for i, (_, clean, trig) in enumerate(CASES):
        x[i, :, 2, 4] = SCALE * clean
        x[i, :, 2, 5] = SCALE * trig
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
