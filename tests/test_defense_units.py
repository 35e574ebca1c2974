"""The erasers' building blocks against hand-computed values (DHBE's are in test_dhbe.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.adversarial import pgd
from trials.checkpoint import load_state, save_state
from trials.data.pipeline import random_rotate
from trials.defenses import DefenseContext, DefenseData, make_defense
from trials.defenses.adversarial_finetuning import AdversarialFinetuneParams, augment
from trials.defenses.bcu import distillation_loss, partial_reinit
from trials.defenses.clp import channel_lipschitz_upper_bounds
from trials.defenses.pbe import similarity_scores
from trials.models import build_model


def _ctx(**kw):
    return DefenseContext(
        device=torch.device("cpu"), seed=0, generator=torch.Generator().manual_seed(0), **kw
    )


class OneConvBn(nn.Module):
    def __init__(self, cout: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, cout, 3, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def conv_bn_pairs(self):
        return [(self.conv, self.bn)]

    def forward(self, x):
        return self.bn(self.conv(x))


def test_clp_upper_bound_matches_hand_values():
    layer = OneConvBn(3)
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.conv.weight[0, 0, 0, 0] = 2.0  # the 2 x 9 matrix has one entry: spectral norm 2
        layer.conv.weight[1, :, 1, 1] = torch.tensor([3.0, 4.0])  # a column (3, 4): norm 5
        layer.conv.weight[2, 0, :, :] = 1.0  # a row of nine ones: norm 3
        layer.bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0]))
        layer.bn.running_var.copy_(torch.tensor([4.0, 1.0, 9.0]))
    uclc = channel_lipschitz_upper_bounds(layer.conv, layer.bn)
    torch.testing.assert_close(uclc, torch.tensor([2 * 1 / 2, 5 * 0.5 / 1, 3 * 2 / 3]))
    with_eps = channel_lipschitz_upper_bounds(layer.conv, layer.bn, bn_eps=True)
    assert with_eps[0] == pytest.approx(2 / math.sqrt(4 + layer.bn.eps))


def test_clp_uses_the_spectral_norm_of_the_reshaped_kernel():
    layer = OneConvBn(4)
    with torch.no_grad():
        layer.bn.running_var.uniform_(0.5, 2)
        layer.bn.weight.uniform_(-1, 1)
    expected = torch.stack([torch.linalg.svdvals(w.reshape(2, 9))[0] for w in layer.conv.weight.detach()])
    expected = expected * layer.bn.weight.detach().abs() / layer.bn.running_var.sqrt()
    torch.testing.assert_close(channel_lipschitz_upper_bounds(layer.conv, layer.bn), expected)


def test_clp_prunes_exactly_the_planted_outlier_channel():
    torch.manual_seed(0)
    layer = OneConvBn(16)
    with torch.no_grad():
        layer.conv.weight.normal_(0, 0.1)
        layer.bn.bias.fill_(0.3)
        layer.conv.weight[5] *= 20  # the planted backdoor channel
    gamma, beta = layer.bn.weight.detach().clone(), layer.bn.bias.detach().clone()
    make_defense("clp", {"u": 3.0}).run(layer, None, _ctx())
    pruned = (layer.bn.weight == 0) & (layer.bn.bias == 0)
    assert pruned.nonzero().flatten().tolist() == [5]
    keep = torch.arange(16) != 5
    assert torch.equal(layer.bn.weight[keep], gamma[keep]) and torch.equal(layer.bn.bias[keep], beta[keep])


def test_clp_threshold_uses_mean_plus_u_unbiased_std():
    layer = OneConvBn(4)
    with torch.no_grad():
        layer.conv.weight.zero_()
        for c, v in enumerate([1.0, 1.0, 1.0, 4.0]):
            layer.conv.weight[c, 0, 0, 0] = v
    # UCLC = (1, 1, 1, 4): mean 1.75, unbiased std 1.5; u = 1.4 -> threshold 3.85 prunes channel 3,
    # u = 1.6 -> threshold 4.15 prunes nothing (a biased std, 1.299, would prune at both)
    make_defense("clp", {"u": 1.6}).run(layer, None, _ctx())
    assert int((layer.bn.weight == 0).sum()) == 0
    make_defense("clp", {"u": 1.4}).run(layer, None, _ctx())
    assert (layer.bn.weight == 0).nonzero().flatten().tolist() == [3]


def test_bcu_reinitializes_each_stage_at_its_ratio_and_leaves_bn_alone():
    model = build_model("mini_resnet", 10, 32, (0.5,) * 3, (0.25,) * 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = {"stem": 0.1, "layer1": 0.2, "layer2": 0.3, "layer3": 0.4, "layer4": 0.5, "head": 0.6}
    replaced = partial_reinit(model, ratios, torch.Generator().manual_seed(0))
    after = model.state_dict()
    for stage, module in model.stages().items():
        changed, total = 0, 0
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                for t in ("weight", "bias"):
                    if getattr(layer, t) is not None:
                        key = next(k for k, v in model.named_parameters() if v is getattr(layer, t))
                        changed += int((after[key] != before[key]).sum())
                        total += before[key].numel()
        p = ratios[stage]
        assert abs(changed / total - p) <= 4 * math.sqrt(p * (1 - p) / total) + 1e-3, (stage, changed / total)
        assert replaced[stage] == pytest.approx(changed / total, abs=2e-3)
    bn_keys = [k for k in after if any(s in k for s in ("running_mean", "running_var", "num_batches"))]
    bn_keys += [
        f"{n}.{t}"
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for t in ("weight", "bias")
    ]
    assert bn_keys and all(torch.equal(after[k], before[k]) for k in bn_keys)


def test_bcu_loss_is_batchmean_kl_without_t_squared():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    temp = 2.0
    p_t, p_s = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(distillation_loss(s, t, temp), expected)


def test_pgd_stays_within_epsilon_and_raises_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))
    eps = 6 / 255
    adv = pgd(model, x, y, eps, eps / 5, 7)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert (adv - x).abs().max() >= eps * 0.99  # 7 steps of eps/5 reach the boundary
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    model.train()
    pgd(model, x, y, eps, eps / 5, 1)
    assert model.training  # the caller's mode is restored


def test_pbe_similarity_score():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(similarity_scores(a, b), torch.tensor([1.0, 0.0, 0.5 + 0.5 / math.sqrt(2)]))


def test_random_rotate_turns_images_within_range():
    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 16, 16:] = 1.0  # a ray from the center to the right edge
    out = random_rotate(x, 10.0, 1.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, x)
    ys, xs = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    angles = torch.atan2((ys - 16) * out[:, 0], (xs - 16) * out[:, 0]).flatten(1)
    weight = out[:, 0].flatten(1)
    mean_angle = (angles * weight).sum(1) / weight.sum(1)
    assert mean_angle.abs().max() <= math.radians(10) + 0.02
    assert torch.equal(random_rotate(x, 10.0, 0.0, torch.Generator()), x)


# --- PBE/AFT augmentation (the code's kornia pipeline: per-batch coins) -----------------------------
# Constant white images make each transformation visible: a crop off the center brings in a zero
# border, a rotation darkens the corners; an untouched image stays exactly 1 everywhere.
BATCHES, BATCH = 400, 16


def _augmented_batches(mode: str, crop_pad: int, rotation: float) -> torch.Tensor:
    p = AdversarialFinetuneParams(crop_pad=crop_pad, rotation=rotation, augmentation=mode)
    g = torch.Generator().manual_seed(0)
    x = torch.ones(BATCH, 1, 12, 12)
    return torch.stack([augment(x, p, False, g) for _ in range(BATCHES)])  # batch, image, C, H, W


def _sigma(q: float, n: int) -> float:
    return math.sqrt(q * (1 - q) / n)


def test_official_augmentation_crops_whole_batches_with_p_08():
    out = _augmented_batches("official", crop_pad=5, rotation=0.0)
    shifted = (out == 0).flatten(2).any(2)  # batch, image: a zero border came in
    per_batch = shifted.sum(1)
    # one coin per batch: all images cropped or none (a crop at the center offset, 1 in 121, shows
    # nothing, so a cropped batch may have an unshifted image or two)
    assert bool(((per_batch == 0) | (per_batch >= BATCH - 3)).all()), per_batch.tolist()
    cropped = (per_batch > 0).float().mean().item()
    assert abs(cropped - 0.8) <= 4 * _sigma(0.8, BATCHES), cropped
    assert torch.equal(out[per_batch == 0], torch.ones_like(out[per_batch == 0]))


def test_official_augmentation_rotates_a_quarter_of_images_in_gated_batches_only():
    out = _augmented_batches("official", crop_pad=0, rotation=10.0)
    rotated = out.flatten(2).amin(2) < 0.999  # batch, image: a darkened corner
    gated = rotated.any(1)  # a gated batch with all 16 per-image coins off has p 2^-16
    assert abs(gated.float().mean().item() - 0.5) <= 4 * _sigma(0.5, BATCHES)
    # batches the gate left out are not touched at all (not even resampled)
    assert torch.equal(out[~gated], torch.ones_like(out[~gated]))
    inside = rotated[gated].float().mean().item()
    assert abs(inside - 0.5) <= 4 * _sigma(0.5, int(gated.sum()) * BATCH), inside
    # per image 0.5 x 0.5; the batch gate correlates images, so the spread is the batches'
    # (per-batch variance 0.5 * (0.25 + 0.25 / 16) - 0.25^2 = 0.0703)
    overall = rotated.float().mean().item()
    assert abs(overall - 0.25) <= 4 * math.sqrt(0.0703 / BATCHES), overall


def test_per_sample_augmentation_keeps_per_image_coins():
    crops = _augmented_batches("per_sample", crop_pad=5, rotation=0.0)
    shifted = (crops == 0).flatten(2).any(2)
    q = 0.8 * 120 / 121  # cropped, and not at the center offset
    assert abs(shifted.float().mean().item() - q) <= 4 * _sigma(q, BATCHES * BATCH)
    mixed = ((shifted.sum(1) > 0) & (shifted.sum(1) < BATCH)).float().mean().item()
    assert mixed >= 0.9  # all 16 cropped: 0.79^16 = 0.02; none: 0.2^16
    turns = _augmented_batches("per_sample", crop_pad=0, rotation=10.0)
    rotated = turns.flatten(2).amin(2) < 0.999
    assert abs(rotated.float().mean().item() - 0.5) <= 4 * _sigma(0.5, BATCHES * BATCH)
    assert bool(rotated.any(1).all())  # no batch is left out as a whole (p 2^-16 each)


class _RecordTrainingBatches(nn.Module):
    """Identity that records, in train mode (the SGD steps, not PGD or scoring), which images it saw:
    image i is the constant 5 i / 255."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def forward(self, x):
        if self.training:
            self.batches.append((x[:, 0, 0, 0] * 255 / 5).round().long().tolist())
        return x


def _ordered_run(defense: str, mode: str) -> list[list[int]]:
    n = 40
    images = (torch.arange(n, dtype=torch.uint8) * 5).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    labels = torch.arange(n) % 3
    recorder = _RecordTrainingBatches()
    model = nn.Sequential(recorder, nn.Flatten(), nn.Linear(16, 3))
    kind = "poisoned_train" if defense == "pbe" else "clean_labeled"
    data = DefenseData(kind, images, labels, "test", 3, (1, 4, 4), flip=False)
    # no crop, rotation or PGD move (eps 0): the images reach the model as they are
    common = {
        "augmentation": mode,
        "crop_pad": 0,
        "rotation": 0.0,
        "eps": 0.0,
        "pgd_steps": 1,
        "batch_size": 4,
    }
    extra = (
        {"initial_pool": 0.25, "pool_schedule": [0.5], "epochs_per_step": 2, "later_adversarial_batches": 1}
        if defense == "pbe"
        else {"epochs": 2, "adversarial_epochs": 1}
    )
    make_defense(defense, {**common, **extra}).run(model, data, _ctx())
    return recorder.batches


def test_pbe_official_mode_visits_the_pool_in_index_order():
    batches = _ordered_run("pbe", "official")
    # step 0: pool of 10 in batches 4, 4, 2 for two epochs; step 1: pool of 20, 5 batches x 2
    assert [len(b) for b in batches] == [4, 4, 2] * 2 + [4] * 10
    epochs = [sum(batches[:3], []), sum(batches[3:6], []), sum(batches[6:11], []), sum(batches[11:], [])]
    for epoch in epochs:
        assert epoch == sorted(epoch) and len(set(epoch)) == len(epoch), epoch
    assert epochs[0] == epochs[1] and epochs[2] == epochs[3]  # the same order every epoch


def test_pbe_per_sample_mode_and_aft_reshuffle_every_epoch():
    batches = _ordered_run("pbe", "per_sample")
    epochs = [sum(batches[:3], []), sum(batches[3:6], []), sum(batches[6:11], []), sum(batches[11:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert epochs[2] != sorted(epochs[2]) and epochs[3] != sorted(epochs[3])
    # the official AFT script loads its clean set with shuffle=True: both modes reshuffle
    for mode in ("official", "per_sample"):
        aft = _ordered_run("aft", mode)
        first, second = sum(aft[:10], []), sum(aft[10:], [])
        assert sorted(first) == sorted(second) == list(range(40)) and first != second


def test_augmentation_mode_is_checked():
    from trials.errors import InvalidValue

    with pytest.raises(InvalidValue, match=r"param 'augmentation'.*'per_image'.*official, per_sample"):
        make_defense("pbe", {"augmentation": "per_image"})


def test_checkpoint_round_trip_keeps_optimizer_state():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_state({"step": 7, "opt": opt.state_dict(), "t": (1, "a")}, folder)
        loaded = load_state(folder)
    assert loaded["step"] == 7 and loaded["t"] == (1, "a")
    assert set(loaded["opt"]["state"]) == {0, 1}  # int keys survive
    torch.testing.assert_close(
        loaded["opt"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )


def test_defense_streams_are_independent_of_the_attack_with_the_same_seed():
    # Regression: PBE's random 5 % "clean" pool, drawn with seed 0 like the attack's poison choice,
    # was exactly the attack's first poisoned images (randperm of the same n with the same seed).
    from trials.device import derive_seed, make_generator

    n, poisoned, pool = 1293, 129, 65
    attack_pick = set(torch.randperm(n, generator=make_generator(torch.device("cpu"), 0))[:poisoned].tolist())
    defense_gen = make_generator(torch.device("cpu"), derive_seed(0, "defense", "pbe"))
    defense_pick = torch.randperm(n, generator=defense_gen)[:pool].tolist()
    overlap = sum(i in attack_pick for i in defense_pick)
    assert overlap <= 20  # chance level is 65 * 10 % = 6.5; the shared stream gave 65
    assert derive_seed(0, "defense", "pbe") == derive_seed(0, "defense", "pbe")  # stable
    assert (
        len(
            {
                derive_seed(0, "defense", "pbe"),
                derive_seed(1, "defense", "pbe"),
                derive_seed(0, "defense", "bcu"),
            }
        )
        == 3
    )
