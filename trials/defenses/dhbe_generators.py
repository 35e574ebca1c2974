"""DHBE's two generators (docs/defenses/dhbe.md; official `gan.py`, written anew here).

- `SampleGenerator` (the paper's G, code `GeneratorB`, DFAD's "GeneratorA"): z -> a synthetic image
  that is already in the classifier's *normalized* space (it ends with BatchNorm2d(C, affine=False)).
- `PatchGenerator` (the paper's Gp, code `PatchGeneratorPreBN`): z2 -> a p x p patch in (-1, 1), in
  *pixel* units, that `random_pad` places at one random location per batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _split_size(size: int, largest_init: int) -> tuple[int, int]:
    """(init size, number of x2 upsample blocks): halve while the size is even and above `largest_init`.

    Gives the code's tables: 32 -> (8, 2), 28 -> (7, 2), 64 -> (8, 3); patches 3..9 -> (p, 0),
    10 -> (5, 1), 12 -> (6, 1), 16 -> (8, 1), 18 -> (9, 1), 20 -> (5, 2).
    """
    blocks = 0
    while size > largest_init and size % 2 == 0:
        size //= 2
        blocks += 1
    return size, blocks


def _up_blocks(ngf: int, count: int) -> nn.ModuleList:
    """`count` blocks conv3x3 -> BN -> LeakyReLU(0.2), each after a x2 nearest upsample; inputs have
    2*ngf channels, the last block outputs ngf and the others 2*ngf."""
    blocks = []
    for i in range(count):
        cout = ngf if i + 1 == count else 2 * ngf
        blocks.append(
            nn.Sequential(
                nn.Conv2d(2 * ngf, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)
            )
        )
    return nn.ModuleList(blocks)


class SampleGenerator(nn.Module):
    """G: Linear(nz -> 2ngf*s*s) -> BN(2ngf) -> [up x2 -> conv -> BN -> LeakyReLU] * k
    -> conv3x3(ngf -> C) -> Tanh -> BatchNorm2d(C, affine=False). Output: normalized images."""

    def __init__(self, nz: int = 256, ngf: int = 64, channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.init_size, num_up = _split_size(image_size, 8)
        width = 2 * ngf if num_up else ngf
        self.l1 = nn.Linear(nz, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width)
        self.blocks = _up_blocks(ngf, num_up)
        self.conv_out = nn.Conv2d(ngf, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z.flatten(1)).view(len(z), -1, self.init_size, self.init_size)
        h = self.bn0(h)
        for block in self.blocks:
            h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.bn_out(torch.tanh(self.conv_out(h)))


class PatchGenerator(nn.Module):
    """Gp: Linear(nz2 -> ngf*p*p) -> BN(ngf) -> (no activation: the code's quirk, kept)
    -> conv3x3(ngf -> C) -> BatchNorm2d(C, affine=False) -> Tanh. Output: patches in (-1, 1), pixel units.
    Patches above 9 px (even) are grown by x2 upsample blocks as in the code (e.g. 10 = 5 x 2)."""

    def __init__(
        self, nz: int = 256, ngf: int = 64, channels: int = 3, patch_size: int = 5, image_size: int = 32
    ) -> None:
        super().__init__()
        if not 1 <= patch_size <= image_size:
            raise ValueError(f"patch size {patch_size} must be between 1 and the image size {image_size}")
        self.patch_size, self.image_size = patch_size, image_size
        self.init_size, num_up = _split_size(patch_size, 9)
        width = 2 * ngf if num_up else ngf
        self.l1 = nn.Linear(nz, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width)
        self.blocks = _up_blocks(ngf, num_up)
        self.conv_out = nn.Conv2d(ngf, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l1(z.flatten(1)).view(len(z), -1, self.init_size, self.init_size)
        h = self.bn0(h)
        for block in self.blocks:
            h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
        return torch.tanh(self.bn_out(self.conv_out(h)))

    def random_pad(self, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Zero-pad the patches to the image size at ONE (top, left), drawn uniformly for the whole batch."""
        room = self.image_size - self.patch_size + 1
        top, left = torch.randint(0, room, (2,), generator=generator, device=generator.device).tolist()
        right = self.image_size - self.patch_size - left
        bottom = self.image_size - self.patch_size - top
        return F.pad(patch, (left, right, top, bottom))
