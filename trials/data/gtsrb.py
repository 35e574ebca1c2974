"""GTSRB (German traffic signs, 43 classes) through torchvision, from a local root, resized."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trials.data.base import Dataset, RawImages, require_root
from trials.data.images import decode_images
from trials.data.registry import register_dataset
from trials.errors import InvalidValue
from trials.params import param


@dataclass(frozen=True)
class GtsrbParams:
    size: int = param(32, "images are resized to size x size", low=8, high=512)
    download: bool = param(False, "fetch the data into --data-root if it is not there (never in tests)")


@register_dataset("gtsrb")
class Gtsrb(Dataset):
    Params = GtsrbParams
    flip = False  # mirrored signs change meaning (left/right turns)

    def load_raw(self) -> RawImages:
        import torchvision

        if not self.params.download:
            require_root(self.root, self.name, "torchvision's gtsrb folder")
        elif not self.root:
            raise InvalidValue("--data-root", self.root, "download=true needs a folder to download into")
        try:
            train = torchvision.datasets.GTSRB(self.root, split="train", download=self.params.download)
            test = torchvision.datasets.GTSRB(self.root, split="test", download=self.params.download)
        except RuntimeError as err:
            raise InvalidValue("--data-root", self.root, f"GTSRB not found there ({err})") from None
        size = (self.params.size, self.params.size)
        return RawImages(
            train_x=decode_images([p for p, _ in train._samples], size),
            train_y=np.array([y for _, y in train._samples]),
            test_x=decode_images([p for p, _ in test._samples], size),
            test_y=np.array([y for _, y in test._samples]),
            class_names=[str(c) for c in range(43)],
        )
