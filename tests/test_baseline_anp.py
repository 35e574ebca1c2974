"""ANP's building blocks against hand-computed values (the contract test runs the whole defense)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from trials.defenses import DefenseContext, make_defense
from trials.defenses.anp import batch_norms, bn_overrides, choose_threshold, optimize_masks, prune


def _ctx():
    return DefenseContext(device=torch.device("cpu"), seed=0, generator=torch.Generator().manual_seed(0))


class ConvBnHead(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_substituted_bn_is_gamma_m_plus_delta_and_beta_one_plus_xi():
    model = ConvBnHead(3)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        model.bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bns = batch_norms(model)
    masks = {"bn": torch.tensor([1.0, 0.5, 0.0])}
    delta, xi = {"bn": torch.tensor([0.1, -0.2, 0.3])}, {"bn": torch.tensor([0.5, 0.0, -1.0])}
    noisy = bn_overrides(bns, masks, (delta, xi))
    torch.testing.assert_close(noisy["bn.weight"], torch.tensor([1.1, 0.6, -0.3]))
    torch.testing.assert_close(noisy["bn.bias"], torch.tensor([0.75, -1.0, 0.0]))
    plain = bn_overrides(bns, masks)
    torch.testing.assert_close(plain["bn.weight"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(plain["bn.bias"], torch.tensor([0.5, -1.0, 2.0]))
    # the functional call computes the BN with exactly those affine parameters, in eval mode too
    model.eval()
    x = torch.rand(2, 3, 5, 5)
    h = model.conv(x)
    expected = F.batch_norm(
        h,
        model.bn.running_mean,
        model.bn.running_var,
        noisy["bn.weight"],
        noisy["bn.bias"],
        False,
        0.0,
        model.bn.eps,
    )
    expected = model.head(F.relu(expected).mean((2, 3)))
    torch.testing.assert_close(functional_call(model, noisy, (x,)), expected)
    assert set(model.state_dict()) == {
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "head.weight",
        "head.bias",
    }


def test_masks_stay_in_unit_interval_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = ConvBnHead(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (20, 3, 6, 6), dtype=torch.uint8)
    labels = torch.randint(0, 3, (20,))
    # a large mask learning rate makes the clamp bind on both sides
    p = make_defense("anp", {"iterations": 15, "batch_size": 8, "mask_lr": 20.0}).params
    masks = optimize_masks(model, images, labels, p, _ctx(), flip=True)
    m = masks["bn"]
    assert m.shape == (8,)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert ((m == 0) | (m == 1)).any() and not torch.equal(m, torch.ones(8))
    # the optimisation ran in train mode on a copy: BN statistics and weights of the model unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_noise_ascent_is_eps_sign_gradient_and_unprojected_by_default(monkeypatch):
    # one step: the perturbation is U(-eps, eps) + eps * sign(grad), beyond eps somewhere (the code
    # does not project) and within 2 eps; with project_noise it is clipped to eps
    import trials.defenses.anp as anp

    torch.manual_seed(1)
    model = ConvBnHead(16)
    images = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    labels = torch.randint(0, 3, (16,))
    largest: list[float] = []

    def spy(bns, masks, noise=None):
        if noise is not None:
            largest.append(
                max(float(v.detach().abs().max()) for v in (*noise[0].values(), *noise[1].values()))
            )
        return bn_overrides(bns, masks, noise)

    monkeypatch.setattr(anp, "bn_overrides", spy)
    for project in (False, True):
        largest.clear()
        p = make_defense("anp", {"iterations": 3, "batch_size": 8, "project_noise": project}).params
        optimize_masks(model, images, labels, p, _ctx(), flip=False)
        if project:
            assert max(largest) <= 0.4 + 1e-6
        else:
            assert 0.4 < max(largest) <= 0.8 + 1e-6


def test_pruning_zeroes_exactly_the_gammas_below_threshold():
    model = ConvBnHead(5)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        model.bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    masks = {"bn": torch.tensor([0.0, 0.19, 0.2, 0.5, 1.0])}
    counts = prune(model, masks, 0.2)
    assert counts == {"bn": 2}
    assert model.bn.weight.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0]
    torch.testing.assert_close(model.bn.bias, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))  # beta kept (code)
    prune(model, masks, 0.2, prune_bias=True)
    torch.testing.assert_close(model.bn.bias, torch.tensor([0.0, 0.0, 0.3, 0.4, 0.5]))


class BnOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(x).flatten(1)


def test_clean_acc_rule_keeps_the_largest_threshold_within_budget():
    # logits = the two input channels (BN at identity): pruning both channels makes every logit
    # beta = 0, so accuracy falls to the share of class 0; masks 0.3 -> pruned from threshold 0.35
    model = BnOnly().eval()
    x = torch.rand(40, 2, 1, 1)
    y = x.flatten(1).argmax(1)
    masks = {"bn": torch.tensor([0.3, 0.3])}
    threshold, info = choose_threshold(model, masks, x, y, budget=0.1, prune_bias=False)
    assert threshold == 0.3
    assert info["clean_acc_unpruned"] == 1.0 and info["clean_acc_by_threshold"]["0.35"] < 0.9
    masks = {"bn": torch.tensor([1.0, 1.0])}
    assert choose_threshold(model, masks, x, y, budget=0.1, prune_bias=False)[0] == 0.9
