"""PreAct-ResNet-18 (He et al. 2016), as BackdoorBench and BPE/PBE define it (WaNet's model).

The modules carry the published names, so a BackdoorBench or BPE checkpoint loads as it is (after
`bdlab import-checkpoint` adds the input normalization it was trained behind; docs/models.md):
`conv1` (3 -> 64, 3x3, stride 1, no bias), `layer1`..`layer4` of two `PreActBlock`s each (`bn1`,
`conv1`, `bn2`, `conv2`, and `shortcut.0`, a 1x1 conv without BN or bias, where the stride or width
changes), global average pooling and `linear`. The stem keeps stride 1 at every input size, as
BackdoorBench's adaptive-pooling version does. There is no BN + ReLU between `layer4` and the
pooling: the published network pools the last block's raw residual sum. An earlier version of this
file added that final BN + ReLU (the textbook pre-activation tail, as in the Wide ResNets); it was
removed so that the published numbers and checkpoints compare.

For the platform's contract, `stem` is `conv1` and `head` is `linear` (read-only aliases, so the
state dict holds each tensor once, under the published name).

Blocks run BN -> ReLU -> conv; only `conv1` of a block is followed by a BN that normalizes exactly
its output (the block's `bn2`); `bn1` normalizes a residual sum, so it pairs with no single conv.
`conv_bn_pairs` therefore lists (conv1, bn2) only, the restriction CLP needs on this architecture
(docs/models.md, docs/defenses/clp.md).
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
        # a Sequential as in the published code, so the weight is `shortcut.0.weight`
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))
            if stride != 1 or cin != cout
            else None
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
    def __init__(self, blocks, widths, num_classes: int, mean, std) -> None:
        super().__init__(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        cin = widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            layer: list[nn.Module] = []
            for b in range(count):
                layer.append(PreActBlock(cin, width, (1 if i == 0 else 2) if b == 0 else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.linear = nn.Linear(cin, num_classes)
        init_weights(self)

    @property
    def stem(self) -> nn.Conv2d:
        return self.conv1

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return self.linear


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int, image_size: int, mean, std) -> PreActResNet:
    # image_size is not used: the published network has a stride-1 stem and adaptive pooling
    return PreActResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, mean, std)
