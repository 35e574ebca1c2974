"""Patch triggers: a small pattern pasted at given positions, and the amplified multi-stamp presets.

The amplified presets of algorithms.md 2.6 paste the same patch several times: `x4` at the four
corners, `x5` at the corners plus the centre (the DHBE code's `AmplifiedTrigger`), and `x9` on the
3x3 grid of corners, edge midpoints and centre (the DHBE paper's Table 6).
"""

from __future__ import annotations

import torch

Position = tuple[int, int]  # (top, left)

# Named 3x3 patterns (values in [0, 1], the same on every channel unless the pattern has 3 channels).
PATTERNS: dict[str, list[list[float]]] = {
    # BackdoorBench / BCU / PBE
    "backdoorbench": [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
    # DHBE's tri1_3x3
    "dhbe": [[0, 1, 0], [1, 0, 1], [0, 1, 0]],
    "white": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
}


def checkerboard(size: int, inverse: bool = False) -> torch.Tensor:
    """A size x size checkerboard starting with white (or black, `inverse`), on 3 channels."""
    grid = (torch.arange(size)[:, None] + torch.arange(size)[None, :] + int(inverse)) % 2 == 0
    return grid.float().expand(3, size, size).clone()


def make_pattern(name: str, size: int) -> torch.Tensor:
    """3 x size x size pattern in [0, 1]. Named 3x3 patterns are resized by nearest neighbour."""
    if name == "checkerboard":
        return checkerboard(size)
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
