"""MCR's building blocks against hand-computed values (the contract test runs the whole defense)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from trials.defenses.mcr import curve_point, learning_rate_factor, update_bn, write_point


def test_curve_point_at_0_half_and_1():
    theta0 = {"w": torch.tensor([1.0, 2.0])}
    theta1 = {"w": torch.tensor([3.0, 0.0])}
    theta2 = {"w": torch.tensor([5.0, -2.0])}
    torch.testing.assert_close(curve_point(0.0, theta0, theta1, theta2)["w"], theta0["w"])
    torch.testing.assert_close(curve_point(1.0, theta0, theta1, theta2)["w"], theta2["w"])
    # 0.25 * (1, 2) + 0.5 * (3, 0) + 0.25 * (5, -2)
    torch.testing.assert_close(curve_point(0.5, theta0, theta1, theta2)["w"], torch.tensor([3.0, 0.0]))
    # the midpoint bend makes the curve the straight line
    mid = {"w": (theta0["w"] + theta2["w"]) / 2}
    torch.testing.assert_close(
        curve_point(0.3, theta0, mid, theta2)["w"], 0.7 * theta0["w"] + 0.3 * theta2["w"]
    )


def test_the_bend_gets_c1_times_the_gradient_at_theta_t():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    theta0 = {n: torch.randn_like(q) for n, q in model.named_parameters()}
    theta2 = {n: torch.randn_like(q) for n, q in model.named_parameters()}
    theta1 = {n: torch.randn_like(q).requires_grad_(True) for n, q in model.named_parameters()}
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    t = 0.3
    F.cross_entropy(functional_call(model, curve_point(t, theta0, theta1, theta2), (x,)), y).backward()
    at_t = {n: v.detach().requires_grad_(True) for n, v in curve_point(t, theta0, theta1, theta2).items()}
    F.cross_entropy(functional_call(model, at_t, (x,)), y).backward()
    for n in theta1:
        torch.testing.assert_close(theta1[n].grad, 2 * t * (1 - t) * at_t[n].grad)  # c1(0.3) = 0.42


def _bn_model():
    return nn.Sequential(nn.BatchNorm2d(3))


def test_bn_statistics_are_reset_and_equal_the_clean_batch_statistics():
    torch.manual_seed(0)
    model = _bn_model()
    bn = model[0]
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    bn.momentum = 0.1
    x = torch.rand(10, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    update_bn(model.eval(), x, batch_size=64)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3), unbiased=True))
    assert bn.momentum == 0.1 and not model.training  # restored
    # two batches (6 and 4 images): the size-weighted average of the batch statistics
    update_bn(model, x, batch_size=6)
    a, b = x[:6], x[6:]
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)))
    expected_var = (6 * a.var((0, 2, 3), unbiased=True) + 4 * b.var((0, 2, 3), unbiased=True)) / 10
    torch.testing.assert_close(bn.running_var, expected_var)


def test_write_point_sets_theta_t_and_fresh_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    names = [n for n, _ in model.named_parameters()]
    theta = [{n: torch.randn_like(q) for n, q in model.named_parameters()} for _ in range(3)]
    x = torch.rand(8, 3, 2, 2)
    write_point(model, 0.25, *theta, x, batch_size=8)
    point = curve_point(0.25, *theta)
    for n, q in model.named_parameters():
        torch.testing.assert_close(q, point[n])
    assert names
    h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)))
    assert not model.training


@pytest.mark.parametrize(
    ("epoch", "factor"), [(1, 1.0), (5, 1.0), (7, 1.0 - 0.2 / 0.4 * 0.99), (9, 0.01), (10, 0.01)]
)
def test_learning_rate_schedule_of_the_code(epoch, factor):
    assert learning_rate_factor(epoch, 10) == pytest.approx(factor)
