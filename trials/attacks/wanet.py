"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warp as the trigger.

Warping field, as in the official code: a uniform [-1, 1] tensor of shape 1x2xkxk divided by its
mean |.|, upsampled bicubically to HxW; grid = clamp((identity + s * noise / H) * grid_rescale,
-1, 1) with the identity grid from linspace(-1, 1); x' = grid_sample(x, grid, align_corners=True).
The field is drawn from a generator seeded with the trial seed, so every seed of a sweep has its
own warp, as every run of the official code does.

Variant implemented: poisoning is BackdoorBench-style, a fixed seeded `ratio` of the training set
relabeled once, instead of the official code's "first 10 % of every batch" drawn afresh; the budget
in expectation is the same. The warp is applied to those images after each batch's random crop
(`stamps_after_augmentation`), where the official code warps first and then crops, rotates and
flips the warped batch: warping before the crop shifts the field by a few pixels against the
test-time one, and on digits the model did not learn it (crop pad 2: ASR 0.05). The stored poisoned set holds the warped images, for the record.

Noise ("cross") mode: in every training batch (after augmentation), `cross_ratio` times as many
non-poisoned images as the batch's expected poisoned count are warped with the grid plus
uniform(-1, 1)/H jitter and keep their true label, which forces the model to learn the exact warp
rather than any warp (official code: the images after the poisoned ones in the batch).

WaNet is known to need a long schedule (official: 1,000 epochs; BCU: 200) because the warp moves
pixels by a fraction of a pixel (s = 0.5 on 32x32 inputs: about 0.25 px on average).
Parameters, their sources and the measured figures: docs/attacks/wanet.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trials.attacks.base import Attack, DirtyLabelParams
from trials.attacks.registry import register_attack
from trials.params import param


@dataclass(frozen=True)
class WaNetParams(DirtyLabelParams):
    k: int = param(4, "side of the random control grid (official: 4)", low=2, high=64)
    s: float = param(0.5, "warping strength (official: 0.5)", low=0.0)
    grid_rescale: float = param(
        1.0, "scale of the warped grid before clamping (official: 1)", low=0.0, low_exclusive=True
    )
    noise: bool = param(True, "noise mode: also train on randomly jittered warps that keep their label")
    cross_ratio: float = param(2.0, "noise-mode images per poisoned image in a batch (official: 2)", low=0.0)


@register_attack("wanet")
class WaNet(Attack):
    Params = WaNetParams

    def __init__(self, params: WaNetParams, num_classes: int, image_shape, seed: int) -> None:
        super().__init__(params, num_classes, image_shape, seed)
        gen = torch.Generator().manual_seed(seed)
        self.noise_grid, self.identity_grid = make_grids(params.k, image_shape[1], image_shape[2], gen)
        self._poison_fraction: float | None = None

    @property
    def grid(self) -> torch.Tensor:
        """1,H,W,2 sampling grid of the trigger."""
        p = self.params
        h = self.image_shape[1]
        return warp_grid(self.identity_grid, self.noise_grid, p.s, h, p.grid_rescale)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def select(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        index = super().select(labels, generator)
        self._poison_fraction = len(index) / max(len(labels), 1)  # `count` may override `ratio`
        return index

    # --- stamping after augmentation, and noise mode ---------------------------------------
    has_batch_hook = True
    stamps_after_augmentation = True

    def batch_hook(
        self, x: torch.Tensor, y: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ):  # noqa: ANN201
        x, y = super().batch_hook(x, y, poisoned, generator)
        if not self.params.noise:
            return x, y
        fraction = self._poison_fraction if self._poison_fraction is not None else self.params.ratio
        candidates = torch.nonzero(~poisoned).flatten()
        count = min(int(round(self.params.cross_ratio * fraction * len(x))), len(candidates))
        if count == 0:
            return x, y
        h = self.image_shape[1]
        pick = candidates[torch.randperm(len(candidates), device=x.device, generator=generator)[:count]]
        jitter = (
            torch.rand((count, *self.identity_grid.shape[1:]), device=x.device, generator=generator) * 2 - 1
        )
        grid = (self.grid.to(x.device, x.dtype) + jitter.to(x.dtype) / h).clamp(-1, 1)
        x = x.clone()
        x[pick] = F.grid_sample(x[pick], grid, align_corners=True).clamp(0, 1)
        return x, y

    # --- rendering and state --------------------------------------------------------------------
    def render_trigger(self) -> torch.Tensor:
        # The warp moves pixels by a fraction of a pixel: on a one-pixel checkerboard that shows as
        # a visible modulation of the gray levels, where a natural image would look unchanged.
        c, h, w = self.image_shape
        board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2).float()
        return self.apply(board.expand(1, c, h, w).clone())[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {"noise_grid": self.noise_grid, "identity_grid": self.identity_grid}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.noise_grid = tensors["noise_grid"].float()
        self.identity_grid = tensors["identity_grid"].float()


def make_grids(k: int, h: int, w: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise grid, identity grid), each 1,H,W,2 in grid_sample's (x, y) order."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((cols, rows), dim=2)[None]
    return noise, identity


def warp_grid(
    identity: torch.Tensor, noise: torch.Tensor, s: float, h: int, rescale: float = 1.0
) -> torch.Tensor:
    return ((identity + s * noise / h) * rescale).clamp(-1, 1)
