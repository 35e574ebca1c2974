"""Wide ResNets WRN-40-1 and WRN-40-2 (Zagoruyko & Komodakis 2016), as in the DHBE paper.

Three groups of six pre-activation blocks (widths 16k, 32k, 64k; strides 1, 2, 2) after a 3x3
stem conv, a final BN + ReLU, pooling and the head. There are three stages, so `stage_names` is
(stem, layer1, layer2, layer3). As in PreAct-ResNet, a block's (conv1, bn2) is its only
conv -> BN pair.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.models.base import ConvBnPair, ImageClassifier, init_weights
from trials.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout or stride != 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        skip = self.shortcut(act) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + skip

    def own_conv_bn_pairs(self) -> list[ConvBnPair]:
        return [(self.conv1, self.bn2)]


class WideResNet(ImageClassifier):
    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(self, depth: int, widen: int, num_classes: int, image_size: int, mean, std) -> None:
        super().__init__(mean, std)
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(3, 16, 3, stride=2 if image_size >= 64 else 1, padding=1, bias=False)
        cin = 16
        for i, width in enumerate(widths):
            layer: list[nn.Module] = []
            for b in range(n):
                layer.append(WideBlock(cin, width, (1 if i == 0 else 2) if b == 0 else 1))
                cin = width
            if i == len(widths) - 1:
                layer += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.head = nn.Linear(cin, num_classes)
        init_weights(self)


@register_model("wrn40_1")
def wrn40_1(num_classes: int, image_size: int, mean, std) -> WideResNet:
    return WideResNet(40, 1, num_classes, image_size, mean, std)


@register_model("wrn40_2")
def wrn40_2(num_classes: int, image_size: int, mean, std) -> WideResNet:
    return WideResNet(40, 2, num_classes, image_size, mean, std)
