"""CIFAR-10 and CIFAR-100 through torchvision, from a local root.

Nothing is downloaded unless the user sets the dataset parameter `download=true`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trials.data.base import Dataset, RawImages, require_root
from trials.data.registry import register_dataset
from trials.errors import InvalidValue
from trials.params import param


@dataclass(frozen=True)
class TorchvisionParams:
    download: bool = param(False, "fetch the data into --data-root if it is not there (never in tests)")


class _TorchvisionCifar(Dataset):
    Params = TorchvisionParams
    folder: str

    def load_raw(self) -> RawImages:
        import torchvision

        root = self.root
        if self.params.download:
            if not root:
                raise InvalidValue("--data-root", root, "download=true needs a folder to download into")
        else:
            require_root(root, self.name, f"torchvision's {self.folder} folder")
        cls = torchvision.datasets.CIFAR10 if self.name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            train = cls(root, train=True, download=self.params.download)
            test = cls(root, train=False, download=self.params.download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise InvalidValue(
                "--data-root",
                root,
                f"{self.folder} not found there ({err}); pass --dataset-param download=true",
            ) from None
        return RawImages(
            train_x=np.asarray(train.data),
            train_y=np.asarray(train.targets),
            test_x=np.asarray(test.data),
            test_y=np.asarray(test.targets),
            class_names=list(train.classes),
        )


@register_dataset("cifar10")
class Cifar10(_TorchvisionCifar):
    folder = "cifar-10-batches-py"
    # BackdoorBench / BCU statistics (docs/datasets.md)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.247, 0.243, 0.261)


@register_dataset("cifar100")
class Cifar100(_TorchvisionCifar):
    folder = "cifar-100-python"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
