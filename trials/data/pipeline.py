"""The data path of a trial: batches drawn from tensors already on the device, augmented there.

No DataLoader workers and no per-sample PIL: an epoch is a permutation of indices, a batch is an
index into the resident uint8 tensor, and random-crop-with-padding and horizontal flip are single
batched operations. `benchmarks/data_path.py` measures this against a conventional pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _shifted_windows(
    x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor | None
) -> torch.Tensor:
    """Image i of the result: the HxW window at (dy[i], dx[i]) of x[i] zero-padded by `pad`, mirrored
    left-right where flip[i]. One gather over the flattened padded images, for any dtype and device
    (about 7x faster on the CPU than advanced indexing with four broadcast index tensors)."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    cols = torch.arange(w, device=x.device)
    cols = cols.expand(n, w) if flip is None else torch.where(flip[:, None], cols.flip(0), cols)  # N,W
    rows = torch.arange(h, device=x.device) * wp  # H
    index = (dy * wp + dx).view(n, 1, 1) + rows.view(1, h, 1) + cols.view(n, 1, w)  # N,H,W into hp*wp
    flat = padded.reshape(n, c, hp * wp)
    return flat.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def _offsets(
    x: torch.Tensor, pad: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    return dy, dx


def _flips(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Pad every image by `pad` zeros on each side and crop back at a random offset per image."""
    if pad <= 0:
        return x
    dy, dx = _offsets(x, pad, generator)
    return _shifted_windows(x, pad, dy, dx, None)


def random_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _flips(x, generator)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding, then horizontal flip where it keeps the meaning.

    Crop and flip run as one gather; the random draws (offsets, then flips) and so the results are
    those of `random_flip(random_crop(x, pad, g), g)` for the same generator state.
    """

    pad: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.pad <= 0:
            return random_flip(x, generator) if self.flip else x
        dy, dx = _offsets(x, self.pad, generator)
        flip = _flips(x, generator) if self.flip else None
        return _shifted_windows(x, self.pad, dy, dx, flip)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float input passes through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> uint8, rounding, as a trigger pasted on an image file would be stored."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@contextlib.contextmanager
def single_threaded(device: torch.device | str) -> Iterator[None]:
    """Run the block's CPU tensor ops on one intra-op thread (a no-op for other devices).

    A batch's data path (index, crop+flip, to_float) is a few small memory-bound ops, about 0.3 ms on
    one core for 128 CIFAR-sized images, that gain little from more threads on an idle machine; but
    when other processes keep the cores busy each parallel op waits for a descheduled thread, and the
    data path took 30-80 ms per batch instead of about 1 ms on one thread (2-core machine, load 4-5;
    `bdlab bench`). `torch.set_num_threads` is process-wide: the previous count is restored on exit.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def random_rotate(
    x: torch.Tensor, degrees: float, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Rotate each float image, with probability p, by an angle uniform in [-degrees, degrees] about
    its center (bilinear, zeros outside), as one batched grid_sample."""
    if degrees <= 0 or p <= 0:
        return x
    n = x.shape[0]
    angle = (torch.rand(n, device=x.device, generator=generator) * 2 - 1) * degrees * torch.pi / 180
    angle = torch.where(
        torch.rand(n, device=x.device, generator=generator) < p, angle, torch.zeros_like(angle)
    )
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(angle)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
