"""NAD (neural attention distillation): attention map and loss against hand values, and the defense
on digits BadNets."""

from __future__ import annotations

import math

import pytest
import quality as q
import torch

from trials.defenses import make_defense
from trials.defenses.nad import attention_loss, attention_map
from trials.errors import InvalidValue

# started at the session's start (tests/conftest.py), trained while the other tests run
QUALITY_RUNS = [("nad_short", 0), ("nad_plain", 0)]


def _student_teacher():
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s[0, 1] = torch.tensor([[0.0, -1.0], [0.0, 0.0]])  # |F|: the sign does not matter
    t = torch.zeros(1, 3, 2, 2)  # the channel count may differ; only positions are compared
    t[0, 2, 0, 0] = 3.0
    return s, t


def test_attention_map_is_the_normalized_channel_sum_of_squares():
    s, t = _student_teacher()
    # sum_c F^2 = [1, 1, 0, 4], L2 norm sqrt(18)
    expected = torch.tensor([[1.0, 1.0, 0.0, 4.0]]) / math.sqrt(18)
    torch.testing.assert_close(attention_map(s), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(attention_map(t), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=1e-6)
    # p = 1: sum_c |F| = [1, 1, 0, 2], norm sqrt(6)
    torch.testing.assert_close(
        attention_map(s, 1.0), torch.tensor([[1.0, 1.0, 0.0, 2.0]]) / math.sqrt(6), atol=1e-6, rtol=1e-6
    )


def test_attention_loss_is_the_mean_squared_difference_and_spares_the_teacher():
    s, t = _student_teacher()
    s.requires_grad_(True)
    t.requires_grad_(True)
    r = 1 / math.sqrt(18)
    expected = ((r - 1) ** 2 + r**2 + 0.0 + (4 * r) ** 2) / 4  # mean over 1 image x 4 positions
    loss = attention_loss(s, t)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_nad_needs_one_beta_per_residual_stage(tiny_attacked):
    from trials.run import defense_data

    defense = make_defense("nad", {"betas": [1.0, 2.0], "data_count": 4})
    with pytest.raises(InvalidValue, match="layer1, layer2, layer3, layer4"):
        defense.run(tiny_attacked.model, defense_data(defense, tiny_attacked, seed=0), None)


@pytest.mark.quality
def test_attention_distillation_erases_badnets_where_plain_fine_tuning_does_not(quality_runs):
    # digits / mini_resnet BadNets, the same recipe (`bdlab attack --dataset digits --model mini_resnet
    # --attack badnets --param size=3 --param target=0`; docs/defenses/nad.md), 57 clean images,
    # teacher 2 epochs, student 3 epochs at lr 0.01:
    # betas default ACC 0.972, ASR 0.117 (seed 1: 0.950 / 0.006); betas 0 ACC 0.967, ASR 1.000.
    # Seeds 0 / 1, native and default: ASR 0.000-0.043 (drop <= 0.044), plain 0.97-1.00: one seed runs
    m = quality_runs.metrics("nad_short")
    assert q.erases("nad_short")(m), m
    assert set(m["findings"]["at_loss_last_batch"]) == {"layer1", "layer2", "layer3", "layer4"}
    plain = quality_runs.metrics("nad_plain")
    assert q.kept(plain), plain
