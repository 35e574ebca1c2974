"""Trigger stamping checked against hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from trials.attacks import make_attack
from trials.attacks.patch import DHBE_TRIGGER_SIZES, amplified_positions, dhbe_trigger, make_pattern, paste
from trials.errors import InvalidValue

SHAPE = (3, 8, 8)


def test_badnets_stamps_backdoorbench_pattern_bottom_right():
    attack = make_attack("badnets", {}, 10, SHAPE, 0)
    x = torch.full((2, 3, 8, 8), 0.5)
    out = attack.apply(x)
    expected = x.clone()
    expected[:, :, 5:8, 5:8] = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(out, expected)
    assert torch.equal(x, torch.full((2, 3, 8, 8), 0.5)), "apply must not modify its input"


def test_badnets_location_offset_and_size():
    attack = make_attack(
        "badnets", {"location": "top_left", "offset": 1, "size": 2, "pattern": "white"}, 10, SHAPE, 0
    )
    out = attack.apply(torch.zeros(1, 3, 8, 8))
    expected = torch.zeros(1, 3, 8, 8)
    expected[:, :, 1:3, 1:3] = 1
    assert torch.equal(out, expected)


def test_amplified_positions_by_hand():
    # 8x8 image, 2x2 patch: rows/cols 0, (8-2)//2 = 3, 6
    assert amplified_positions("x4", (8, 8), (2, 2)) == [(0, 0), (0, 6), (6, 0), (6, 6)]
    assert amplified_positions("x5", (8, 8), (2, 2)) == [(0, 0), (0, 6), (6, 0), (6, 6), (3, 3)]
    assert sorted(amplified_positions("x9", (8, 8), (2, 2))) == sorted(
        (r, c) for r in (0, 3, 6) for c in (0, 3, 6)
    )
    # the DHBE code's centre copy of a 3x3 patch on 32x32 covers rows/cols 14-16
    assert amplified_positions("x5", (32, 32), (3, 3))[-1] == (14, 14)


def test_badnets_amplified_stamps():
    attack = make_attack("badnets", {"pattern": "white", "size": 2}, 10, SHAPE, 0)
    for preset, count in (("x4", 4), ("x5", 5), ("x9", 9)):
        out = attack.apply_amplified(torch.zeros(1, 3, 8, 8), preset)
        assert int(out[0, 0].sum()) == 4 * count
        for top, left in amplified_positions(preset, (8, 8), (2, 2)):
            assert torch.all(out[0, :, top : top + 2, left : left + 2] == 1)


def test_paste_with_mask_blends():
    x = torch.zeros(1, 1, 4, 4)
    patch = torch.ones(1, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    out = paste(x, patch, [(1, 1)], mask)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1:3, 1:3] = mask
    assert torch.equal(out, expected)


def test_blended_formula():
    attack = make_attack("blended", {"alpha": 0.25}, 10, SHAPE, 0)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(attack.apply(x), 0.75 * x + 0.25 * attack.key)
    # the key is seeded by key_seed, not by the trial seed: every seed shares one trigger
    assert torch.equal(
        make_attack("blended", {}, 10, SHAPE, 5).key, make_attack("blended", {}, 10, SHAPE, 0).key
    )
    assert not torch.equal(make_attack("blended", {"key_seed": 1}, 10, SHAPE, 0).key, attack.key)


def test_sig_formula():
    attack = make_attack("sig", {"delta": 20, "frequency": 2}, 10, SHAPE, 0)
    x = torch.full((1, 3, 8, 8), 0.5)
    out = attack.apply(x)
    for j in range(8):
        v = 20 * math.sin(2 * math.pi * j * 2 / 8) / 255
        assert torch.allclose(out[0, :, :, j], torch.full((3, 8), 0.5 + v), atol=1e-6)
    assert torch.all(attack.apply(torch.ones(1, 3, 8, 8)) <= 1)


def test_sig_is_clean_label_on_target_class():
    attack = make_attack("sig", {"target_ratio": 0.5, "target": 2}, 10, SHAPE, 0)
    labels = torch.tensor([2, 1, 2, 2, 0, 2])
    idx = attack.select(labels, torch.Generator().manual_seed(0))
    assert len(idx) == 2 and torch.all(labels[idx] == 2)
    assert torch.equal(attack.poison_labels(labels[idx]), labels[idx])


def test_dirty_label_selection_and_all_to_all():
    labels = torch.arange(10).repeat(10)
    gen = torch.Generator().manual_seed(0)
    a = make_attack("badnets", {"ratio": 0.1}, 10, SHAPE, 0)
    assert len(a.select(labels, gen)) == 10
    b = make_attack("badnets", {"count": 30, "from_target_class": False, "target": 3}, 10, SHAPE, 0)
    idx = b.select(labels, gen)
    assert len(idx) == 30 and not torch.any(labels[idx] == 3)
    c = make_attack("badnets", {"all_to_all": True}, 10, SHAPE, 0)
    assert torch.equal(c.target_labels(torch.tensor([0, 9, 4])), torch.tensor([1, 0, 5]))
    assert torch.all(c.attacked_mask(torch.tensor([0, 9])))
    assert torch.equal(a.attacked_mask(torch.tensor([0, 9])), torch.tensor([False, True]))


# The DHBE code's triggers (yanzhicong/DHBE backdoor/trigger.py), written out by hand.
DHBE_CODE = {
    ("tri1", 1): [[0]],
    ("tri2", 1): [[1]],
    ("tri1", 2): [[0, 1], [1, 0]],
    ("tri2", 2): [[1, 0], [0, 1]],
    ("tri1", 3): [[0, 1, 0], [1, 0, 1], [0, 1, 0]],
    ("tri2", 3): [[1, 0, 1], [0, 1, 0], [1, 0, 1]],
    ("tri1", 5): [
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0],
    ],
    ("tri2", 5): [
        [1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
    ],
    ("tri1", 7): [
        [0, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0, 1, 0],
    ],
    ("tri2", 7): [
        [1, 0, 1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1, 0, 1],
    ],
}


@pytest.mark.parametrize("family, size", sorted(DHBE_CODE))
def test_badnets_stamps_the_dhbe_code_triggers_by_name(family: str, size: int):
    attack = make_attack("badnets", {"pattern": family, "size": size}, 10, SHAPE, 0)
    x = torch.full((2, 3, 8, 8), 0.5)
    expected = x.clone()
    expected[:, :, 8 - size :, 8 - size :] = torch.tensor(DHBE_CODE[family, size], dtype=torch.float32)
    assert torch.equal(attack.apply(x), expected)  # bottom-right, offset 0, every channel


def test_tri2_is_the_inverse_of_tri1_and_checkerboard_its_phase():
    for size in DHBE_TRIGGER_SIZES:
        tri1, tri2 = dhbe_trigger("tri1", size), dhbe_trigger("tri2", size)
        assert torch.equal(tri1 + tri2, torch.ones(3, size, size))
        assert torch.equal(make_pattern("checkerboard", size), tri2)
    assert torch.equal(make_pattern("dhbe", 3), dhbe_trigger("tri1", 3))


def test_old_dhbe_pattern_is_a_nearest_neighbour_enlargement_not_tri1():
    enlarged = [  # tri1_3x3 rows/columns 0, 0, 1, 1, 2
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1],
        [1, 1, 0, 0, 1],
        [0, 0, 1, 1, 0],
    ]
    assert torch.equal(make_pattern("dhbe", 5), torch.tensor(enlarged, dtype=torch.float32).expand(3, 5, 5))
    assert not torch.equal(make_pattern("dhbe", 5), make_pattern("tri1", 5))


def test_dhbe_triggers_only_at_the_code_sizes():
    with pytest.raises(InvalidValue, match="'size'.*1, 2, 3, 5, 7"):
        make_attack("badnets", {"pattern": "tri1", "size": 4}, 10, SHAPE, 0)
    make_attack("badnets", {"pattern": "checkerboard", "size": 4}, 10, SHAPE, 0)  # any size
