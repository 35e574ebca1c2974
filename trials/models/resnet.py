"""ResNet-18/34 (CIFAR variant) and mini_resnet, ResNet-18's topology at width 16.

Stem: 3x3 conv (stride 1; stride 2 for inputs of 64 px or more) + BN + ReLU, no max-pool. Four
stages of BasicBlocks with strides 1/2/2/2 and a 1x1 conv + BN projection shortcut whenever the
stride or width changes; global average pooling; linear head. See docs/models.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trials.models.base import ConvBn, ConvBnPair, ImageClassifier, init_weights
from trials.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            ConvBn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def own_conv_bn_pairs(self) -> list[ConvBnPair]:
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]  # the shortcut's ConvBn declares its own


class ResNet(ImageClassifier):
    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        widths: tuple[int, int, int, int],
        num_classes: int,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__(mean, std)
        self.stem = ConvBn(3, widths[0], 3, stride=2 if image_size >= 64 else 1)
        cin = widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layer = []
            for b in range(count):
                layer.append(BasicBlock(cin, width, stride if b == 0 else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.head = nn.Linear(cin, num_classes)
        init_weights(self)


@register_model("resnet18")
def resnet18(num_classes: int, image_size: int, mean, std) -> ResNet:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, image_size, mean, std)


@register_model("resnet34")
def resnet34(num_classes: int, image_size: int, mean, std) -> ResNet:
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, image_size, mean, std)


@register_model("mini_resnet")
def mini_resnet(num_classes: int, image_size: int, mean, std) -> ResNet:
    """ResNet-18's stem / four stages / head at width 16 and one block per stage: for CPU work."""
    return ResNet((1, 1, 1, 1), (16, 32, 64, 128), num_classes, image_size, mean, std)
