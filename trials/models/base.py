"""The model contract: Normalize inside, named stages, explicit conv->BN pairs, feature hooks.

Every model takes float images in [0, 1] and begins with its own `Normalize`, so attacks and
defenses work in pixel units. `forward_normalized` is the body after Normalize (DHBE's generator
works in normalized space). The body is a sequence of named stages (`stem`, `layer1`..`layerK`)
followed by global average pooling (the penultimate features) and the linear `head`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

ConvBnPair = tuple[nn.Conv2d, nn.BatchNorm2d]


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


class ImageClassifier(nn.Module):
    """Base of every registered model. Subclasses create `stem`, the `layerK` stages and `head`."""

    stage_names: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
    head: nn.Linear

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)

    # --- forward passes ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(self.normalize(x))

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Logits for an already normalized input (the body after Normalize)."""
        return self.head(self.pool(self.body(z)))

    def body(self, z: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            z = getattr(self, name)(z)
        return z

    @staticmethod
    def pool(h: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after global pooling, before the head)."""
        return self.pool(self.body(self.normalize(x)))

    def stage_outputs(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Output of every stage, then `penultimate` and `logits` (for NAD, TAC, layer shifts)."""
        outputs: OrderedDict[str, torch.Tensor] = OrderedDict()
        h = self.normalize(x)
        for name in self.stage_names:
            h = getattr(self, name)(h)
            outputs[name] = h
        outputs["penultimate"] = self.pool(h)
        outputs["logits"] = self.head(outputs["penultimate"])
        return outputs

    # --- structure that defenses act on -----------------------------------------------------
    def stages(self) -> OrderedDict[str, nn.Module]:
        """Stages in order, ending with `head` (BCU's per-stage ratios, NAD's attention maps)."""
        named = OrderedDict((n, getattr(self, n)) for n in self.stage_names)
        named["head"] = self.head
        return named

    def conv_bn_pairs(self) -> list[ConvBnPair]:
        """(conv, the BN that normalizes exactly that conv's output channels), for CLP."""
        pairs: list[ConvBnPair] = []
        for module in self.modules():
            if module is not self and hasattr(module, "own_conv_bn_pairs"):
                pairs.extend(module.own_conv_bn_pairs())
        return pairs


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN at gamma=1 / beta=0, PyTorch's default for Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvBn(nn.Sequential):
    """conv -> BN -> ReLU; declares its own (conv, BN) pair."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)

    def own_conv_bn_pairs(self) -> list[ConvBnPair]:
        return [(self[0], self[1])]
