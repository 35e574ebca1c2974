"""Contract every registered defense passes on a tiny CPU problem in seconds (trials.testing, the
same contract a plugin's defense runs), and the runner's data routing."""

from __future__ import annotations

import pytest
import torch

from trials.defenses import DEFENSES, DefenseContext, make_defense
from trials.device import precision_name
from trials.errors import InvalidValue
from trials.run import defense_data, training_amp
from trials.testing import DefenseContract


class TestEveryDefense(DefenseContract):
    @pytest.fixture(params=DEFENSES.names())
    def defense_name(self, request):
        return request.param


def test_poisoned_training_set_is_rebuilt_from_the_folder(tiny_attacked):
    images, labels = tiny_attacked.poisoned_train()
    import json

    record = json.loads((tiny_attacked.folder / "poison.json").read_text())
    index = torch.tensor(record["index"])
    assert torch.all(labels[index] == 0)  # BadNets target
    corner = images[index][:, :, -3:, -3:]
    assert not torch.equal(corner, tiny_attacked.data.train_x[index][:, :, -3:, -3:])  # the stamped patch
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[index] = False
    assert torch.equal(images[keep], tiny_attacked.data.train_x[keep])


def test_asking_for_more_data_than_held_out_is_an_error(tiny_attacked):
    available = len(tiny_attacked.data.heldout_y)
    defense = make_defense("bcu", {"data_count": available + 1})
    with pytest.raises(InvalidValue, match=f"data_count.*{available + 1}.*at most {available}"):
        defense_data(defense, tiny_attacked, seed=0)


def test_context_report_adds_monitoring_and_keeps_mode():
    model = torch.nn.Linear(2, 2).train()
    seen = []
    ctx = DefenseContext(
        torch.device("cpu"),
        0,
        torch.Generator(),
        progress=seen.append,
        monitor=lambda m: {"val_acc": 0.5, "mode": m.eval().training},
    )
    ctx.report({"step": 1}, model)
    assert seen == [{"phase": "defense", "step": 1, "val_acc": 0.5, "mode": False}]
    assert model.training


def test_validation_monitor_keeps_its_share_of_the_run_and_looks_first(tiny_attacked):
    from trials.metrics import build_eval_set, evaluate
    from trials.run.defense import ValidationMonitor

    held = tiny_attacked.data
    val_set = build_eval_set(held.val_x, held.val_y, tiny_attacked.attack)
    assert val_set.amplified  # a patch trigger: the full evaluation stamps the amplified layouts too
    now = [0.0]

    class Clocked(torch.nn.Module):  # each batch the model sees advances the clock by 0.5 s
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            now[0] += 0.5
            return self.model(x)

    model = Clocked(tiny_attacked.model)
    monitor = ValidationMonitor(val_set, share=0.1, clock=lambda: now[0])
    first = monitor(model)  # the first look always happens: clean + triggered images, 1 s
    full = evaluate(tiny_attacked.model, val_set)
    assert first == {"val_acc": full["acc"], "val_asr": full["asr"]}
    assert monitor.spent == 1.0 and monitor.looks == 1  # two passes, not five (no amplified layouts)
    now[0] = 5.0
    assert monitor(model) == {}  # 1 s of 5 spent looking: over 10 %, skipped
    now[0] = 10.0
    assert monitor(model) == first and monitor.looks == 2  # 1 s of 10: not over 10 %, look
    assert now[0] == 11.0 and monitor.spent == 2.0
    assert monitor(model) == {}  # 2 s of 11
    now[0] = 20.0
    assert monitor(model) == first and monitor.looks == 3  # 2 s of 20


def test_logit_comparing_erasers_train_in_fp32_by_default():
    """Issue 12: DHBE (L1 of nearly equal logits), BCU (distillation) and PBE (logit similarity)
    train in float32 on CUDA unless the trial asks for bf16; the others under bf16 autocast, except
    those that never autocast (I-BAU, CLP, identity), declared fp32 so that the record is true."""
    fp32 = {name for name in DEFENSES.names() if DEFENSES.get(name).precision == "fp32"}
    assert fp32 == {"dhbe", "bcu", "pbe", "ibau", "clp", "identity"}
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # flags only: no CUDA needed
    for name in DEFENSES.names():
        defense = make_defense(name, {})
        assert training_amp(defense, cuda, None) == (name not in fp32), name
        assert training_amp(defense, cuda, True) and not training_amp(defense, cuda, False)
        assert not any(training_amp(defense, cpu, amp) for amp in (None, True, False))  # never on CPU


def test_precision_names():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision_name(cuda, True) == "bf16-autocast"
    assert precision_name(cuda, False) == "fp32+tf32"
    assert precision_name(cpu, False) == "fp32"


def test_attack_records_its_precision(tiny_attacked):
    assert tiny_attacked.spec["precision"] == {"training": "fp32", "evaluation": "fp32"}  # CPU
