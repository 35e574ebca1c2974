"""Patch triggers: a small pattern pasted at given positions, and the amplified multi-stamp presets.

Patterns (values in [0, 1], the same on every channel; `make_pattern(name, size)`):
- `tri1`, `tri2`: the DHBE code's triggers `tri1_kxk` and `tri2_kxk` (backdoor/trigger.py), offered at
  the code's sizes k = 1, 2, 3, 5, 7 only. tri1 is 1 where row + column is odd (its top-left pixel is
  black); tri2 is its inverse (white top-left): tri1_3x3 = [[0,1,0],[1,0,1],[0,1,0]], tri2_3x3 =
  [[1,0,1],[0,1,0],[1,0,1]], tri1_1x1 = [[0]], tri2_1x1 = [[1]].
- `checkerboard`: a checkerboard of any size with a white top-left pixel (tri2's phase; equal to tri2
  at the code's sizes).
- `backdoorbench`, `white`, and `dhbe` (kept for existing specs): 3x3 patterns enlarged by nearest
  neighbour to other sizes. `dhbe` is tri1_3x3, so it equals tri1 at size 3 only: `dhbe` size 5 is
  tri1_3x3 with every pixel repeated (a 5x5 nearest-neighbour enlargement), not the code's tri1_5x5.

The amplified presets paste the same patch several times: `x4` at the four corners, `x5` at the
corners plus the centre (the DHBE code's `AmplifiedTrigger`), and `x9` on the 3x3 grid of corners,
edge midpoints and centre (the DHBE paper's Table 6); see docs/attacks/badnets.md and docs/metrics.md.
"""

from __future__ import annotations

import torch

Position = tuple[int, int]  # (top, left)

# Named 3x3 patterns (values in [0, 1], the same on every channel unless the pattern has 3 channels).
PATTERNS: dict[str, list[list[float]]] = {
    # BackdoorBench / BCU / PBE
    "backdoorbench": [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
    # DHBE's tri1_3x3 (other sizes: nearest-neighbour enlargements; the code's own are `tri1`)
    "dhbe": [[0, 1, 0], [1, 0, 1], [0, 1, 0]],
    "white": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
}

# The DHBE code's trigger families (backdoor/trigger.py): family -> whether it is the checkerboard's
# inverse phase (tri1: black top-left pixel), and the sizes the code defines for each.
DHBE_TRIGGERS: dict[str, bool] = {"tri1": True, "tri2": False}
DHBE_TRIGGER_SIZES = (1, 2, 3, 5, 7)


def checkerboard(size: int, inverse: bool = False) -> torch.Tensor:
    """A size x size checkerboard starting with white (or black, `inverse`), on 3 channels."""
    grid = (torch.arange(size)[:, None] + torch.arange(size)[None, :] + int(inverse)) % 2 == 0
    return grid.float().expand(3, size, size).clone()


def dhbe_trigger(family: str, size: int) -> torch.Tensor:
    """The DHBE code's `<family>_<size>x<size>` trigger (tri1 or tri2), 3 x size x size in {0, 1}."""
    if family not in DHBE_TRIGGERS:
        raise ValueError(f"unknown DHBE trigger family {family!r}; allowed: {', '.join(DHBE_TRIGGERS)}")
    if size not in DHBE_TRIGGER_SIZES:
        raise ValueError(
            f"the DHBE code has no {family}_{size}x{size}; sizes: {', '.join(map(str, DHBE_TRIGGER_SIZES))}"
        )
    return checkerboard(size, inverse=DHBE_TRIGGERS[family])


def make_pattern(name: str, size: int) -> torch.Tensor:
    """3 x size x size pattern in [0, 1]. Named 3x3 patterns are resized by nearest neighbour."""
    if name == "checkerboard":
        return checkerboard(size)
    if name in DHBE_TRIGGERS:
        return dhbe_trigger(name, size)
    base = torch.tensor(PATTERNS[name], dtype=torch.float32)[None, None]
    grown = torch.nn.functional.interpolate(base, size=(size, size), mode="nearest")[0]
    return grown.expand(3, size, size).clone()


def corner_position(
    corner: str, image_hw: tuple[int, int], patch_hw: tuple[int, int], offset: int = 0
) -> Position:
    h, w = image_hw
    ph, pw = patch_hw
    top = offset if corner.startswith("top") else h - ph - offset
    left = offset if corner.endswith("left") else w - pw - offset
    return top, left


def amplified_positions(preset: str, image_hw: tuple[int, int], patch_hw: tuple[int, int]) -> list[Position]:
    h, w = image_hw
    ph, pw = patch_hw
    rows = {"top": 0, "middle": (h - ph) // 2, "bottom": h - ph}
    cols = {"left": 0, "center": (w - pw) // 2, "right": w - pw}
    corners = [(rows[r], cols[c]) for r in ("top", "bottom") for c in ("left", "right")]
    if preset == "x4":
        return corners
    if preset == "x5":
        return corners + [(rows["middle"], cols["center"])]
    if preset == "x9":
        return [(rows[r], cols[c]) for r in rows for c in cols]
    raise ValueError(f"unknown amplified preset {preset!r}; allowed: x4, x5, x9")


def paste(
    x: torch.Tensor, patch: torch.Tensor, positions: list[Position], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Paste `patch` (C,h,w) into every image of `x` (N,C,H,W) at each position; returns a copy.

    With `mask` (h,w or C,h,w, values in [0,1]) the result is blended: x*(1-m) + patch*m.
    """
    out = x.clone()
    ph, pw = patch.shape[-2:]
    patch = patch.to(x.dtype).to(x.device)
    for top, left in positions:
        region = out[:, :, top : top + ph, left : left + pw]
        if mask is None:
            region.copy_(patch.expand_as(region))
        else:
            m = mask.to(x.device, x.dtype)
            region.copy_(region * (1 - m) + patch * m)
    return out
