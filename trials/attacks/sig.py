"""SIG (Barni et al. 2019): a horizontal sinusoid added to target-class images, clean label.

v(i, j) = delta * sin(2 pi j f / m) on the 0-255 scale (m = image width; f = cycles per image, as
in Barni's formula, not the DHBE code's period-in-pixels reading: docs/attacks/sig.md), the same
on every row and channel; x' = clip(x + v). Only target-class training images are poisoned, and they keep their
label: `target_ratio` is relative to the target class (BackdoorBench: 80 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trials.attacks.base import Attack, CleanLabelParams, select_target_class
from trials.attacks.registry import register_attack
from trials.params import param


@dataclass(frozen=True)
class SigParams(CleanLabelParams):
    delta: float = param(20.0, "amplitude on the 0-255 scale (training)", low=0.0, high=255.0)
    frequency: float = param(6.0, "cycles across the image width", low=0.0, low_exclusive=True)
    test_delta: float | None = param(
        None, "amplitude at test time; None = delta (PBE used 10, BackdoorBench 40)", low=0.0
    )


@register_attack("sig")
class Sig(Attack):
    Params = SigParams
    clean_label = True

    def _signal(self, delta: float, device, dtype) -> torch.Tensor:
        w = self.image_shape[-1]
        j = torch.arange(w, device=device, dtype=torch.float64)
        row = delta * torch.sin(2 * math.pi * j * self.params.frequency / w) / 255
        return row.to(dtype).view(1, 1, 1, w)

    def _add(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        return (x + self._signal(delta, x.device, x.dtype)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        return self._add(x, p.delta if p.test_delta is None else p.test_delta)

    def poison_images(self, x, labels, ctx):
        from trials.data.pipeline import to_float, to_uint8

        return to_uint8(self._add(to_float(x), self.params.delta))

    def select(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return select_target_class(labels, self.params.target, self.params.target_ratio, generator)

    def render_trigger(self) -> torch.Tensor:
        c, h, w = self.image_shape
        return (0.5 + self._signal(self.params.delta, "cpu", torch.float32)).expand(1, c, h, w)[0].clone()
