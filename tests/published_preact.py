"""PreActResNet18 as BackdoorBench (`models/preact_resnet.py`) and BPE (`classifier_models/
preact_resnet.py`) publish it, written out by hand from their architecture (their code is not
imported or copied): the state-dict names and shapes, and a functional forward pass over such a
state dict, to check that `preact_resnet18` is the same network.

    conv1: 3 -> 64, 3x3, stride 1, padding 1, no bias
    layer1..layer4: two PreActBlocks each (widths 64/128/256/512, first block strides 1/2/2/2)
        block: out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut
        shortcut = Sequential(conv 1x1, stride, no bias) applied to relu(bn1(x)) where the stride
        or width changes (`shortcut.0`), else x
    pooling: global average (BackdoorBench: AdaptiveAvgPool2d(1); BPE: AvgPool2d(4) at 32x32)
    linear: 512 -> num_classes; no BN or ReLU between layer4 and the pooling
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WIDTHS = (64, 128, 256, 512)


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def _blocks():
    """(prefix, cin, cout, stride) of the eight blocks."""
    cin = 64
    for i, width in enumerate(WIDTHS):
        for j in range(2):
            stride = (1 if i == 0 else 2) if j == 0 else 1
            yield f"layer{i + 1}.{j}", cin, width, stride
            cin = width


def state_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the published PreActResNet18, name -> shape."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3)}
    for prefix, cin, cout, stride in _blocks():
        shapes.update(_bn(f"{prefix}.bn1", cin))
        shapes[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3)
        shapes.update(_bn(f"{prefix}.bn2", cout))
        shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
        if stride != 1 or cin != cout:
            shapes[f"{prefix}.shortcut.0.weight"] = (cout, cin, 1, 1)
    shapes["linear.weight"] = (num_classes, 512)
    shapes["linear.bias"] = (num_classes,)
    return shapes


def random_state(num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the published names with random values (BN statistics included), the kind of
    file `torch.save(model.state_dict())` writes there."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in state_shapes(num_classes).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("bn1.weight", "bn2.weight")):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The published forward pass in eval mode (x already normalized as the training code did)."""

    def bn(prefix: str, h: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            h,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    h = F.conv2d(x, state["conv1.weight"], stride=1, padding=1)
    for prefix, cin, cout, stride in _blocks():
        out = F.relu(bn(f"{prefix}.bn1", h))
        if stride != 1 or cin != cout:
            skip = F.conv2d(out, state[f"{prefix}.shortcut.0.weight"], stride=stride)
        else:
            skip = h
        out = F.conv2d(out, state[f"{prefix}.conv1.weight"], stride=stride, padding=1)
        out = F.conv2d(F.relu(bn(f"{prefix}.bn2", out)), state[f"{prefix}.conv2.weight"], padding=1)
        h = out + skip
    pooled = h.mean((2, 3))
    return F.linear(pooled, state["linear.weight"], state["linear.bias"])
