"""The data path of a trial: batches drawn from tensors already on the device, augmented there.

No DataLoader workers and no per-sample PIL: an epoch is a permutation of indices, a batch is an
index into the resident uint8 tensor, and random-crop-with-padding and horizontal flip are single
batched operations. `benchmarks/data_path.py` measures this against a conventional pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Pad every image by `pad` zeros on each side and crop back at a random offset per image."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N,1,H,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N,1,1,W
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding, then horizontal flip where it keeps the meaning."""

    pad: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = random_crop(x, self.pad, generator)
        return random_flip(x, generator) if self.flip else x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float input passes through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> uint8, rounding, as a trigger pasted on an image file would be stored."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def batch_indices(
    n: int, batch_size: int, *, shuffle: bool, drop_last: bool, generator: torch.Generator | None, device
) -> Iterator[torch.Tensor]:
    """The index batches of one epoch over `n` items."""
    order = (
        torch.randperm(n, device=device, generator=generator) if shuffle else torch.arange(n, device=device)
    )
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
