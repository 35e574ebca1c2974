"""Label-consistent, Trojaning and WaNet on hand-made tensors and tiny untrained models (no training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trials.attacks import make_attack
from trials.attacks.label_consistent import pgd_linf
from trials.attacks.patch import checkerboard
from trials.attacks.trojannn import optimize_trigger, strongest_channels
from trials.attacks.wanet import make_grids, warp_grid
from trials.models import build_model

SHAPE = (3, 32, 32)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mini_resnet", 10, 32, MEAN, STD).eval()


def stub_ctx(model: torch.nn.Module, n: int = 16, seed: int = 0) -> SimpleNamespace:
    """What the attacks read from an AttackContext, without training anything."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *SHAPE), generator=gen, dtype=torch.uint8)
    y = torch.arange(n) % 10
    data = SimpleNamespace(train_x=x, train_y=y, device=torch.device("cpu"))
    return SimpleNamespace(
        clean_model=lambda: model, data=data, device=torch.device("cpu"), generator=gen, amp=False
    )


# --- WaNet ------------------------------------------------------------------------------------


def test_wanet_identity_grid_when_strength_is_zero():
    attack = make_attack("wanet", {"s": 0.0}, 10, SHAPE, seed=3)
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(attack.apply(x), x, atol=1e-5, rtol=0)


def test_wanet_grid_construction_and_range():
    noise, identity = make_grids(4, 32, 32, torch.Generator().manual_seed(0))
    assert noise.shape == identity.shape == (1, 32, 32, 2)
    # identity: x (last dim 0) runs along the width, y along the height, both from -1 to 1
    assert torch.allclose(identity[0, 0, :, 0], torch.linspace(-1, 1, 32))
    assert torch.allclose(identity[0, :, 0, 1], torch.linspace(-1, 1, 32))
    # the kxk field is normalized to mean |.| = 1 before upsampling; its corners survive
    # bicubic upsampling with align_corners=True
    assert noise.abs().max() > 0.5
    for s in (0.5, 5.0, 500.0):
        grid = warp_grid(identity, noise, s, 32)
        assert grid.min() >= -1 and grid.max() <= 1
    attack = make_attack("wanet", {"s": 500.0}, 10, SHAPE, seed=0)
    assert attack.grid.min() >= -1 and attack.grid.max() <= 1


def test_wanet_grid_is_seeded_and_restorable():
    a = make_attack("wanet", {}, 10, SHAPE, seed=1)
    b = make_attack("wanet", {}, 10, SHAPE, seed=1)
    c = make_attack("wanet", {}, 10, SHAPE, seed=2)
    assert torch.equal(a.grid, b.grid) and not torch.equal(a.grid, c.grid)
    c.load_state(a.state())
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c.apply(x), a.apply(x))


def test_wanet_warp_matches_grid_sample_and_moves_pixels_a_little():
    attack = make_attack("wanet", {}, 10, SHAPE, seed=0)
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    expected = F.grid_sample(x, attack.grid.expand(2, -1, -1, -1), align_corners=True)
    torch.testing.assert_close(attack.apply(x), expected)
    shift = (attack.grid - attack.identity_grid).abs() * 15.5  # in pixels
    assert 0 < shift.mean() < 1  # s = 0.5: a fraction of a pixel on average


def test_wanet_batch_hook_warps_poisoned_rows_after_augmentation_and_jitters_others():
    attack = make_attack("wanet", {"ratio": 0.1, "cross_ratio": 2.0}, 10, SHAPE, seed=0)
    assert attack.has_batch_hook and attack.stamps_after_augmentation
    x = torch.rand(50, *SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.arange(50) % 10
    poisoned = torch.zeros(50, dtype=torch.bool)
    poisoned[:5] = True
    out, out_y = attack.batch_hook(x, y, poisoned, torch.Generator().manual_seed(1))
    assert torch.equal(out_y, y)  # labels were set at poisoning time; noise mode keeps them
    torch.testing.assert_close(out[:5], attack.apply(x[:5]))  # the exact test-time warp
    changed = (out[5:] - x[5:]).flatten(1).abs().amax(1) > 0
    assert int(changed.sum()) == 10  # cross_ratio * ratio * batch = 0.2 * 50, all non-poisoned
    jittered = out[5:][changed]
    assert not torch.allclose(jittered, attack.apply(x[5:][changed]))  # jittered, not the exact warp
    assert out.min() >= 0 and out.max() <= 1
    off = make_attack("wanet", {"noise": False}, 10, SHAPE, seed=0)
    same, _ = off.batch_hook(x, y, torch.zeros(50, dtype=torch.bool), torch.Generator().manual_seed(1))
    assert torch.equal(same, x)


def test_wanet_render_shows_the_warp():
    attack = make_attack("wanet", {}, 10, SHAPE, seed=0)
    image = attack.render_trigger()
    assert image.shape == SHAPE and image.min() >= 0 and image.max() <= 1
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float()
    assert (image[0] - board).abs().max() > 0.1


# --- Label-consistent -------------------------------------------------------------------------


def test_pgd_stays_in_eps_ball_and_unit_range():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *SHAPE, generator=gen)
    x[:, :, :4] = 0.0  # pixels at the box bounds must stay inside [0, 1]
    x[:, :, -4:] = 1.0
    y = torch.arange(4) % 10
    eps = 8 / 255
    adv = pgd_linf(model, x, y, eps=eps, step=2 / 255, steps=3, generator=gen)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)
    assert not model.training
    # the perturbation raises the loss it attacks
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_label_consistent_poison_images_eps_and_four_corner_patch():
    attack = make_attack("label_consistent", {"eps": 12 / 255, "steps": 3}, 10, SHAPE, seed=0)
    ctx = stub_ctx(tiny_model())
    x = ctx.data.train_x[:4]
    y = torch.zeros(4, dtype=torch.long)
    out = attack.poison_images(x, y, ctx)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    patch = (checkerboard(3) * 255).to(torch.uint8)
    corners = [(0, 0), (0, 29), (29, 0), (29, 29)]
    inside = torch.ones(32, 32, dtype=torch.bool)
    for top, left in corners:
        assert torch.equal(out[:, :, top : top + 3, left : left + 3], patch.expand(4, -1, -1, -1))
        inside[top : top + 3, left : left + 3] = False
    diff = (out.int() - x.int()).abs()[:, :, inside]
    assert diff.max() <= 12 and diff.max() > 0  # eps = 12/255, stored as uint8


def test_label_consistent_apply_and_amplitude():
    attack = make_attack("label_consistent", {}, 10, SHAPE, seed=0)
    x = torch.full((2, *SHAPE), 0.5)
    out = attack.apply(x)
    for top, left in [(0, 0), (0, 29), (29, 0), (29, 29)]:
        assert torch.equal(out[:, :, top : top + 3, left : left + 3], checkerboard(3).expand(2, -1, -1, -1))
    assert torch.equal(out[:, :, 3:29, :], x[:, :, 3:29, :])
    torch.testing.assert_close(attack.apply_amplified(x, "x4"), out)  # four corners are already x4
    half = attack.stamp(x, 0.5)[:, :, :3, :3]
    torch.testing.assert_close(half, 0.5 * x[:, :, :3, :3] + 0.5 * checkerboard(3))
    single = make_attack("label_consistent", {"location": "bottom_right"}, 10, SHAPE, seed=0).apply(x)
    assert torch.equal(single[:, :, :29], x[:, :, :29])


def test_label_consistent_selects_part_of_target_class():
    attack = make_attack("label_consistent", {"target": 3}, 10, SHAPE, seed=0)
    labels = torch.arange(200) % 10
    index = attack.select(labels, torch.Generator().manual_seed(0))
    assert len(index) == 10 and torch.all(labels[index] == 3)  # 50 % of the 20 target images


# --- Trojaning --------------------------------------------------------------------------------


def test_strongest_channels_reads_the_main_path_conv():
    model = tiny_model()
    conv2 = model.layer3[0].conv2
    with torch.no_grad():
        conv2.weight.fill_(0.01)
        conv2.weight[[5, 7, 9]] = 1.0
        model.layer3[0].shortcut[0].weight[[1, 2, 3]] = 100.0  # the shortcut is not the producing conv
    assert strongest_channels(model.layer3, 3).tolist() == [5, 7, 9]


def test_trojan_trigger_is_confined_to_its_mask_and_raises_the_neurons():
    model = tiny_model()
    attack = make_attack("trojannn", {"steps": 4, "neurons": 4, "size": 5, "batch": 4}, 10, SHAPE, seed=0)
    ctx = stub_ctx(model)
    attack.setup(ctx)
    mask = attack.mask
    assert mask.sum() == 25 and mask[-5:, -5:].all()
    assert torch.all(attack.trigger[:, mask == 0] == 0)
    assert attack.trigger.min() >= 0 and attack.trigger.max() <= 1
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    out = attack.apply(x)
    assert torch.equal(out[:, :, mask == 0], x[:, :, mask == 0])
    assert torch.equal(out[:, :, -5:, -5:], attack.trigger[:, -5:, -5:].expand(4, -1, -1, -1))
    amplified = attack.apply_amplified(x, "x4")
    assert torch.equal(amplified[:, :, :5, :5], attack.trigger[:, -5:, -5:].expand(4, -1, -1, -1))
    assert torch.equal(amplified[:, :, 5:27, 5:27], x[:, :, 5:27, 5:27])

    # the optimized trigger excites the chosen neurons more than a mid-gray square does
    neurons = attack.neuron_index
    images = ctx.data.train_x[:4].float() / 255

    def activation(trigger: torch.Tensor) -> float:
        h = model.normalize(images * (1 - mask) + trigger * mask)
        for name in ("stem", "layer1", "layer2", "layer3"):
            h = getattr(model, name)(h)
        return float(h[:, neurons].mean())

    with torch.no_grad():
        assert activation(attack.trigger) > activation(torch.full(SHAPE, 0.5))
    fresh = make_attack("trojannn", {}, 10, SHAPE, seed=0)
    fresh.load_state(attack.state())
    torch.testing.assert_close(fresh.apply(x), out)


def test_optimize_trigger_outside_mask_is_zero():
    model = tiny_model()
    mask = torch.zeros(32, 32)
    mask[2:6, 10:13] = 1
    stages = [model.stem, model.layer1]
    images = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    trigger = optimize_trigger(
        model,
        stages,
        torch.tensor([0, 1]),
        images,
        mask,
        steps=3,
        lr=0.1,
        target=10.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.all(trigger[:, mask == 0] == 0) and trigger[:, mask == 1].min() > 0


@pytest.mark.parametrize(
    "layer, frozen, trained",
    [
        ("layer3", ["stem", "layer1", "layer2", "layer3"], ["layer4", "head"]),
        ("layer4", ["stem", "layer1", "layer2", "layer3", "layer4"], ["head"]),
        ("stem", ["stem"], ["layer1", "layer2", "layer3", "layer4", "head"]),
    ],
)
def test_trojan_trains_only_the_stages_after_its_layer(layer, frozen, trained):
    model = tiny_model()
    attack = make_attack("trojannn", {"layer": layer}, 10, SHAPE, seed=0)
    params = {id(p) for p in attack.trainable_parameters(model)}
    for name in frozen:
        assert not params & {id(p) for p in getattr(model, name).parameters()}, name
    expected = {id(p) for name in trained for p in getattr(model, name).parameters()}
    assert params == expected


def test_trojan_initial_model_is_a_copy_of_the_clean_model():
    model = tiny_model()
    attack = make_attack("trojannn", {}, 10, SHAPE, seed=0)
    start = attack.initial_model(stub_ctx(model))
    assert start is not model
    for a, b in zip(start.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_trojan_rejects_unknown_layer():
    from trials.errors import InvalidValue

    attack = make_attack("trojannn", {"layer": "head", "steps": 1}, 10, SHAPE, seed=0)
    with pytest.raises(InvalidValue):
        attack.setup(stub_ctx(tiny_model()))
