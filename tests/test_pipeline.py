"""The tensor-resident data path: random crop, random flip, their fused Augment, index batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trials.data.pipeline import (
    Augment,
    batch_indices,
    random_crop,
    random_flip,
    single_threaded,
    to_float,
    to_uint8,
)

# The 3x3 image [[1,2,3],[4,5,6],[7,8,9]] (no zeros, so the zero padding shows) and, by hand, its
# crops after padding by 1: the window at offset (dy, dx) of the 5x5 zero-padded image.
IMAGE = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)
HAND_WINDOWS = {
    (0, 0): [[0, 0, 0], [0, 1, 2], [0, 4, 5]],
    (0, 1): [[0, 0, 0], [1, 2, 3], [4, 5, 6]],
    (0, 2): [[0, 0, 0], [2, 3, 0], [5, 6, 0]],
    (1, 0): [[0, 1, 2], [0, 4, 5], [0, 7, 8]],
    (1, 1): [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
    (1, 2): [[2, 3, 0], [5, 6, 0], [8, 9, 0]],
    (2, 0): [[0, 4, 5], [0, 7, 8], [0, 0, 0]],
    (2, 1): [[4, 5, 6], [7, 8, 9], [0, 0, 0]],
    (2, 2): [[5, 6, 0], [8, 9, 0], [0, 0, 0]],
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def window_offsets(x: torch.Tensor, out: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """For each output image, the (dy, dx) of the padded input's window it equals (all channels)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    found = []
    for i in range(n):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert matches, f"output {i} is no shifted window of the zero-padded input"
        found.append(matches[0])
    return found


# --- random_crop ----------------------------------------------------------------------------------
def test_random_crop_matches_hand_computed_windows():
    x = IMAGE.expand(400, 1, 3, 3).contiguous()
    out = random_crop(x, 1, gen(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    hand = {k: torch.tensor(v, dtype=torch.uint8) for k, v in HAND_WINDOWS.items()}
    seen = set()
    for img in out:
        matches = [k for k, v in hand.items() if torch.equal(img[0], v)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(HAND_WINDOWS)  # all nine offsets occur among 400 draws


def test_random_crop_is_a_shifted_window_per_image_with_uniform_offsets():
    g = gen(2)
    x = torch.randint(0, 256, (300, 3, 5, 7), dtype=torch.uint8, generator=g)  # non-square, 3 channels
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    offsets = window_offsets(x, out, 2)
    counts = torch.zeros(5, 5)
    for dy, dx in offsets:
        counts[dy, dx] += 1
    assert (counts > 0).all()  # every one of the 25 offsets, ~12 times each
    assert counts.max() < 40


def test_random_crop_float_and_pad_zero():
    x = torch.rand(6, 3, 8, 8, generator=gen(3))
    out = random_crop(x, 3, gen(4))
    assert out.dtype == torch.float32
    window_offsets(x, out, 3)
    assert torch.equal(random_crop(x, 0, gen(5)), x)
    assert torch.equal(random_crop(x, -1, gen(5)), x)


def test_random_crop_is_seeded():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=gen(6))
    assert torch.equal(random_crop(x, 4, gen(7)), random_crop(x, 4, gen(7)))
    assert not torch.equal(random_crop(x, 4, gen(7)), random_crop(x, 4, gen(8)))


# --- random_flip ----------------------------------------------------------------------------------
def test_random_flip_gives_image_or_mirror_about_half_the_time():
    g = gen(9)
    x = torch.randint(0, 256, (2000, 3, 4, 6), dtype=torch.uint8, generator=g)
    out = random_flip(x, g)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert not (same & mirrored).any()  # random images are not symmetric: the flip is identifiable
    assert 0.45 < mirrored.float().mean().item() < 0.55


def test_random_flip_mirrors_left_right():
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]]).expand(50, 1, 1, 3)
    out = random_flip(x, gen(10))
    rows = {tuple(r.tolist()) for r in out[:, 0, 0]}
    assert rows == {(1.0, 2.0, 3.0), (3.0, 2.0, 1.0)}


# --- Augment (crop and flip fused) ----------------------------------------------------------------
def test_augment_equals_crop_then_flip():
    x = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8, generator=gen(11))
    for pad in (0, 1, 4):
        for flip in (False, True):
            fused = Augment(pad=pad, flip=flip)(x, gen(12))
            g = gen(12)
            expected = random_crop(x, pad, g)
            expected = random_flip(expected, g) if flip else expected
            assert torch.equal(fused, expected), (pad, flip)
    assert torch.equal(Augment(pad=0, flip=False)(x, gen(13)), x)


def test_augment_outputs_are_windows_or_mirrored_windows():
    g = gen(14)
    x = torch.randint(0, 256, (200, 3, 6, 6), dtype=torch.uint8, generator=g)
    out = Augment(pad=2, flip=True)(x, g)
    padded = F.pad(x, (2, 2, 2, 2))
    mirrored = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i], w.flip(2)) for w in windows)
        assert plain or flipped
        mirrored += flipped and not plain
    assert 60 < mirrored < 140


# --- batch_indices --------------------------------------------------------------------------------
def test_batch_indices_cover_every_index_once_per_epoch():
    g = gen(15)
    batches = list(batch_indices(10, 3, shuffle=True, drop_last=False, generator=g, device="cpu"))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = list(batch_indices(10, 3, shuffle=True, drop_last=False, generator=g, device="cpu"))
    assert sorted(torch.cat(again).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches), torch.cat(again))  # a new permutation each epoch


def test_batch_indices_drop_last_and_order():
    batches = list(batch_indices(10, 3, shuffle=True, drop_last=True, generator=gen(16), device="cpu"))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(set(torch.cat(batches).tolist())) == 9
    exact = list(batch_indices(9, 3, shuffle=True, drop_last=True, generator=gen(16), device="cpu"))
    assert sorted(torch.cat(exact).tolist()) == list(range(9))
    plain = list(batch_indices(7, 4, shuffle=False, drop_last=False, generator=None, device="cpu"))
    assert [b.tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6]]
    # fewer items than one batch: the only (partial) batch is kept even with drop_last
    small = list(batch_indices(5, 8, shuffle=False, drop_last=True, generator=None, device="cpu"))
    assert [b.tolist() for b in small] == [[0, 1, 2, 3, 4]]


def test_to_float_and_back():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.min() == 0 and f.max() == 1
    assert torch.equal(to_uint8(f), x)
    assert to_float(f) is f


def test_single_threaded_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with single_threaded("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        try:
            with single_threaded(torch.device("cpu")):
                raise RuntimeError("inside")
        except RuntimeError:
            pass
        assert torch.get_num_threads() == 2
        with single_threaded(torch.device("cuda")):  # other devices: untouched (no GPU needed)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
