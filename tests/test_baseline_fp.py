"""FP (fine-pruning): the pruning rule on hand-set features, and the defense on digits BadNets."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trials.defenses import DefenseContext, DefenseData, make_defense
from trials.defenses.fp import choose_pruning

# started at the session's start (tests/conftest.py), trained while the other tests run
QUALITY_RUNS = [("fp_prune_only", 0)]

# per-channel mean activations; channel 4 (mean 0.5) alone carries the label
MEANS = [0.6, 0.2, 0.8, 0.1, 0.5, 0.3, 0.9, 0.7]
ASCENDING = [3, 1, 5, 4, 0, 7, 2, 6]


class HandFeatures(nn.Module):
    """features(x) = the spatial mean of each input channel; a linear head on top."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.head.weight.fill_(0.1)  # equal in both rows: no say in the argmax
            self.head.weight[:, 4] = torch.tensor([0.0, 1.0])
            self.head.bias.copy_(torch.tensor([0.0, -0.5]))  # logit1 - logit0 = f4 - 0.5

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _data(n: int = 20) -> DefenseData:
    labels = torch.arange(n) % 2
    images = torch.tensor(MEANS).view(1, 8, 1, 1).repeat(n, 1, 2, 2)
    images[:, 4] = labels.float().view(n, 1, 1)  # 0 or 1: mean 0.5 over the balanced set
    return DefenseData("clean_labeled", images, labels, "hand-set", 2, (8, 2, 2), flip=False)


def _ctx() -> DefenseContext:
    return DefenseContext(device=torch.device("cpu"), seed=0, generator=torch.Generator().manual_seed(0))


def _choose(prune_step: float, max_acc_drop: float):
    model, data = HandFeatures(), _data()
    features = model.features(data.images)
    return choose_pruning(
        features, data.labels, model.head.weight.detach(), model.head.bias, prune_step, max_acc_drop
    )


def test_fp_prunes_exactly_the_lowest_activation_channels_within_budget():
    choice = _choose(prune_step=1 / 8, max_acc_drop=0.1)
    assert choice.order.tolist() == ASCENDING
    # pruning channel 4 would halve the accuracy: the last level within budget is kept, not that one
    assert choice.pruned.tolist() == [3, 1, 5]
    assert (choice.correct_before, choice.correct_after) == (20, 20)


def test_fp_steps_and_never_prunes_every_channel():
    assert _choose(prune_step=0.25, max_acc_drop=0.1).pruned.tolist() == [3, 1]  # levels of 2
    loose = _choose(prune_step=1 / 8, max_acc_drop=0.6)  # a 50 % drop is allowed
    assert loose.pruned.tolist() == ASCENDING[:7] and loose.correct_after == 10


def test_fp_run_keeps_pruned_columns_zero_through_fine_tuning():
    model, ctx = HandFeatures(), _ctx()
    before = model.head.weight.detach().clone()
    params = {"epochs": 1, "min_epoch_size": 20, "batch_size": 10, "crop_pad": 0, "prune_step": 1 / 8}
    make_defense("fp", params).run(model, _data(), ctx)
    w = model.head.weight.detach()
    assert torch.all(w[:, [3, 1, 5]] == 0)
    assert not torch.equal(w[:, [0, 2, 4, 6, 7]], before[:, [0, 2, 4, 6, 7]])  # the rest was fine-tuned
    f = ctx.findings
    assert (f["pruned_channels"], f["channels"], f["pruned_index"]) == (3, 8, [3, 1, 5])
    assert f["clean_acc_before_pruning"] == f["clean_acc_after_pruning"] == 1.0


@pytest.mark.quality
def test_fp_prunes_within_its_budget_on_digits_badnets(quality_runs):
    # pruning alone (no fine-tuning), digits / mini_resnet BadNets of the same recipe (`bdlab attack
    # --dataset digits --model mini_resnet --attack badnets --param size=3 --param target=0`;
    # docs/defenses/fp.md): pruned 46 of 128 channels,
    # clean ACC on the 57 defender images 1.000 -> 0.930, validation ASR 1.000 -> 0.056; seeds 0 / 1,
    # native and default: 44-54 channels, validation ASR 0.000-0.191
    run = quality_runs.run("fp_prune_only")
    m = run["metrics"]
    f = m["findings"]
    assert 0 < f["pruned_channels"] < f["channels"]
    assert f["clean_acc_after_pruning"] >= 0.9 * f["clean_acc_before_pruning"] - 1e-9
    pruned = torch.tensor(f["pruned_index"])
    assert torch.all(run["state"]["head.weight"][:, pruned] == 0)
    assert m["val"]["asr"] < 0.5, m
