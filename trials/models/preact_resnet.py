"""PreAct-ResNet-18 (He et al. 2016; BackdoorBench's and WaNet's default model).

Blocks run BN -> ReLU -> conv; the projection shortcut is a 1x1 conv without BN. Only `conv1` of a
block is followed by a BN that normalizes exactly its output (the block's `bn2`); `bn1` normalizes a
residual sum, so it pairs with no single conv. `conv_bn_pairs` therefore lists (conv1, bn2) only,
the restriction CLP needs on this architecture (docs/models.md, docs/defenses/clp.md). The stem is
a bare conv; the body ends with BN + ReLU before pooling.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.models.base import ConvBnPair, ImageClassifier, init_weights
from trials.models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip

    def own_conv_bn_pairs(self) -> list[ConvBnPair]:
        return [(self.conv1, self.bn2)]


class PreActResNet(ImageClassifier):
    def __init__(self, blocks, widths, num_classes: int, image_size: int, mean, std) -> None:
        super().__init__(mean, std)
        self.stem = nn.Conv2d(3, widths[0], 3, stride=2 if image_size >= 64 else 1, padding=1, bias=False)
        cin = widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            layer: list[nn.Module] = []
            for b in range(count):
                layer.append(PreActBlock(cin, width, (1 if i == 0 else 2) if b == 0 else 1))
                cin = width
            if i == len(blocks) - 1:  # final BN + ReLU of the pre-activation design
                layer += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.head = nn.Linear(cin, num_classes)
        init_weights(self)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int, image_size: int, mean, std) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, image_size, mean, std)
