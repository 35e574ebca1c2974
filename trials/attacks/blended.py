"""Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha k with a full-size key image k.

Default key: a seeded uniform-noise image (no asset licensing), alpha 0.2 (BackdoorBench); any
image file can be given as the key instead (e.g. Hello Kitty), resized to the input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trials.attacks.base import Attack, DirtyLabelParams
from trials.attacks.registry import register_attack
from trials.errors import InvalidValue
from trials.params import param


@dataclass(frozen=True)
class BlendedParams(DirtyLabelParams):
    alpha: float = param(0.2, "blend weight of the key image (PBE uses 0.1)", low=0.0, high=1.0)
    key: str = param("noise", "'noise' (seeded uniform noise) or the path of an image file")
    key_seed: int = param(0, "seed of the noise key (fixed, so every seed of a sweep shares one trigger)")


@register_attack("blended")
class Blended(Attack):
    Params = BlendedParams

    def __init__(self, params: BlendedParams, num_classes: int, image_shape, seed: int) -> None:
        super().__init__(params, num_classes, image_shape, seed)
        c, h, w = image_shape
        if params.key == "noise":
            gen = torch.Generator().manual_seed(params.key_seed)
            # stored as uint8 like a key image file, so the trigger is the same on every device
            self.key = torch.randint(0, 256, (c, h, w), generator=gen, dtype=torch.uint8).float() / 255
        else:
            self.key = _load_key(params.key, (h, w))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a = self.params.alpha
        return (1 - a) * x + a * self.key.to(x.device, x.dtype)

    def render_trigger(self) -> torch.Tensor:
        return self.key.clone()

    def state(self) -> dict[str, torch.Tensor]:
        return {"key": self.key}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.key = tensors["key"].float()


def _load_key(path: str, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    if not Path(path).is_file():
        raise InvalidValue("attack blended: param 'key'", path, "'noise' or an existing image file")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    except OSError:
        raise InvalidValue("attack blended: param 'key'", path, "not a readable image file") from None
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
