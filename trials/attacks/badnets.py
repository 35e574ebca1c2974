"""BadNets (Gu et al. 2017): a small patch in a corner, dirty label.

Default: BackdoorBench's 3x3 pattern [[0,0,1],[0,1,0],[1,0,1]] at the bottom-right corner, 10 % of
the training set poisoned (target-class images included), target 0.

The DHBE code's triggers by name: `pattern=tri1 size=K` is its `tri1_KxK`, `pattern=tri2 size=K` its
`tri2_KxK` (tri1's inverse), for K in 1, 2, 3, 5, 7 (trials.attacks.patch). With
`count=300 from_target_class=false target=9` that is the DHBE paper's BadNets setting at each trigger
size (the code's default model is tri1_3x3). The older `pattern=dhbe` is tri1_3x3 enlarged by nearest
neighbour: equal to `tri1` at size 3 only (its size 5 is not the code's tri1_5x5); `checkerboard` is
tri2's phase at any size. Both are kept so that existing specs and cached models stay valid.

Every pattern, its source and the measured figures: docs/attacks/badnets.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from trials.attacks.base import Attack, DirtyLabelParams
from trials.attacks.patch import (
    DHBE_TRIGGER_SIZES,
    DHBE_TRIGGERS,
    amplified_positions,
    corner_position,
    make_pattern,
    paste,
)
from trials.attacks.registry import register_attack
from trials.errors import InvalidValue
from trials.params import param


@dataclass(frozen=True)
class BadNetsParams(DirtyLabelParams):
    pattern: Literal["backdoorbench", "tri1", "tri2", "dhbe", "white", "checkerboard", "random"] = param(
        "backdoorbench",
        "patch pattern; tri1 / tri2 = the DHBE code's tri1_KxK / tri2_KxK (its inverse), K = size in "
        "1, 2, 3, 5, 7; dhbe = tri1_3x3 enlarged by nearest neighbour (= tri1 at size 3 only); "
        "checkerboard = tri2's phase at any size; random = CLP's sigmoid(N(0,1)) colours, drawn with key_seed",
    )
    size: int = param(3, "patch side in pixels", low=1, high=64)
    location: Literal["bottom_right", "bottom_left", "top_right", "top_left"] = param(
        "bottom_right", "corner the patch is pasted in"
    )
    offset: int = param(0, "distance of the patch from the image border, in pixels", low=0)
    key_seed: int = param(
        0, "seed of the random pattern (fixed, so every seed of a sweep shares one trigger)"
    )

    def __post_init__(self) -> None:
        if self.pattern in DHBE_TRIGGERS and self.size not in DHBE_TRIGGER_SIZES:
            raise InvalidValue(
                "attack badnets: param 'size'",
                self.size,
                f"pattern {self.pattern} is the DHBE code's {self.pattern}_KxK, defined for K in "
                f"{', '.join(map(str, DHBE_TRIGGER_SIZES))} (checkerboard: any size)",
            )


@register_attack("badnets")
class BadNets(Attack):
    Params = BadNetsParams
    patch_trigger = True

    def __init__(self, params: BadNetsParams, num_classes: int, image_shape, seed: int) -> None:
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
