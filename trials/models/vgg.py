"""VGG-16 with BatchNorm, CIFAR variant (one linear classifier after global pooling).

The five convolution blocks (each ending in a 2x2 max-pool) are the stages: `stem` is the first
block (64 channels), `layer1`..`layer4` the blocks of 128, 256, 512 and 512 channels.
"""

from __future__ import annotations

import torch.nn as nn

from trials.models.base import ConvBn, ImageClassifier, init_weights
from trials.models.registry import register_model

BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(ImageClassifier):
    def __init__(self, blocks, num_classes: int, image_size: int, mean, std) -> None:
        super().__init__(mean, std)
        cin = 3
        for name, widths in zip(self.stage_names, blocks, strict=True):
            layers: list[nn.Module] = []
            for width in widths:
                layers.append(ConvBn(cin, width))
                cin = width
            layers.append(nn.MaxPool2d(2))
            setattr(self, name, nn.Sequential(*layers))
        self.head = nn.Linear(cin, num_classes)
        init_weights(self)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int, image_size: int, mean, std) -> VGG:
    return VGG(BLOCKS, num_classes, image_size, mean, std)
