"""BadNets (Gu et al. 2017): a small patch in a corner, dirty label (algorithms.md 6.1).

Default: BackdoorBench's 3x3 pattern [[0,0,1],[0,1,0],[1,0,1]] at the bottom-right corner, 10 % of
the training set poisoned (target-class images included), target 0. `pattern=dhbe` with
`count=300 from_target_class=false target=9` gives the DHBE paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trials.attacks.base import Attack, DirtyLabelParams
from trials.attacks.patch import amplified_positions, corner_position, make_pattern, paste
from trials.attacks.registry import register_attack
from trials.params import param


@dataclass(frozen=True)
class BadNetsParams(DirtyLabelParams):
    pattern: Literal["backdoorbench", "dhbe", "white", "checkerboard", "random"] = param(
        "backdoorbench", "patch pattern; random = CLP's sigmoid(N(0,1)) colours, drawn with key_seed"
    )
    size: int = param(3, "patch side in pixels", low=1, high=64)
    location: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = param(
        "bottom_right", "corner the patch is pasted in"
    )
    offset: int = param(0, "distance of the patch from the image border, in pixels", low=0)
    key_seed: int = param(
        0, "seed of the random pattern (fixed, so every seed of a sweep shares one trigger)"
    )


@register_attack("badnets")
class BadNets(Attack):
    Params = BadNetsParams
    patch_trigger = True

    def __init__(self, params: BadNetsParams, num_classes: int, image_shape, seed: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, num_classes, image_shape, seed)
        if params.pattern == "random":
            gen = torch.Generator().manual_seed(params.key_seed)
            self.patch = torch.sigmoid(torch.randn(3, params.size, params.size, generator=gen))
        else:
            self.patch = make_pattern(params.pattern, params.size)
        hw = image_shape[1:]
        self.position = corner_position(params.location, hw, (params.size, params.size), params.offset)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return paste(x, self.patch, [self.position])

    def apply_amplified(self, x: torch.Tensor, preset: str) -> torch.Tensor:
        return paste(
            x, self.patch, amplified_positions(preset, self.image_shape[1:], tuple(self.patch.shape[1:]))
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.patch = tensors["patch"].float()
