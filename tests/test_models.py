"""Contract of every registered model: Normalize inside, named stages, conv->BN pairs, hooks."""

from __future__ import annotations

import published_preact
import pytest
import torch
import torch.nn as nn

from trials.models import MODELS, build_model
from trials.models.base import ImageClassifier

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module", params=MODELS.names())
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, 7, 32, MEAN, STD).eval()


def test_forward_and_hooks(model):
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert isinstance(model, ImageClassifier)
    # Normalize is inside: the body after it, fed the normalized input, gives the same logits
    z = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.forward_normalized(z), logits)
    torch.testing.assert_close(model.normalize.inverse(z), x)
    outs = model.stage_outputs(x)
    assert list(outs) == [*model.stage_names, "penultimate", "logits"]
    torch.testing.assert_close(outs["logits"], logits)
    assert outs["penultimate"].shape == (2, model.head.in_features)
    torch.testing.assert_close(model.features(x), outs["penultimate"])


def test_stages_cover_every_parameter(model):
    stages = model.stages()
    assert list(stages)[0] == "stem" and list(stages)[-1] == "head"
    staged = {id(p) for m in stages.values() for p in m.parameters()}
    assert staged == {id(p) for p in model.parameters()}


def test_conv_bn_pairs_normalize_their_conv(model):
    pairs = model.conv_bn_pairs()
    assert pairs, "CLP needs at least one pair"
    for conv, bn in pairs:
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.out_channels == bn.num_features
    assert len({id(bn) for _, bn in pairs}) == len(pairs)


def test_bn_pairing_is_functional(model):
    """Each paired BN's input must be exactly its conv's output (checked with forward hooks)."""
    seen = {}
    handles = []
    for conv, bn in model.conv_bn_pairs():
        handles.append(conv.register_forward_hook(lambda m, i, o, c=conv: seen.__setitem__(("c", id(c)), o)))
        handles.append(bn.register_forward_hook(lambda m, i, o, b=bn: seen.__setitem__(("b", id(b)), i[0])))
    model(torch.rand(2, 3, 32, 32))
    for h in handles:
        h.remove()
    for conv, bn in model.conv_bn_pairs():
        assert seen[("c", id(conv))] is seen[("b", id(bn))] or torch.equal(
            seen[("c", id(conv))], seen[("b", id(bn))]
        )


def test_preact_pairs_only_conv1_bn2():
    model = build_model("preact_resnet18", 10, 32, MEAN, STD)
    block = model.layer2[0]
    assert model.conv_bn_pairs()[2] == (block.conv1, block.bn2)
    assert len(model.conv_bn_pairs()) == 8  # one per block: bn1 normalizes a residual sum


def test_preact_resnet18_has_the_published_names_and_shapes():
    """BackdoorBench's and BPE's PreActResNet18, names and shapes written from their architecture
    (tests/published_preact.py): no final BN, `shortcut.0`, `linear`; plus our Normalize buffers."""
    model = build_model("preact_resnet18", 7, 32, MEAN, STD)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours.pop("normalize.mean") == (1, 3, 1, 1) and ours.pop("normalize.std") == (1, 3, 1, 1)
    assert ours == published_preact.state_shapes(7)
    assert sum(p.numel() for p in model.parameters()) == 11_171_146 - 3 * 513  # 11,171,146 at 10 classes
    assert model.stem is model.conv1 and model.head is model.linear


def test_preact_resnet18_computes_the_published_forward():
    """A state dict of the published names loads strictly and gives the published forward pass,
    at 32 and at 64 pixels (the stem keeps stride 1, as BackdoorBench's adaptive-pooling model)."""
    state = published_preact.random_state(7)
    model = build_model("preact_resnet18", 7, 32, MEAN, STD).eval()
    model.load_state_dict(
        {**state, **{k: v for k, v in model.state_dict().items() if k.startswith("normalize.")}}
    )
    for size in (32, 64):
        x = torch.rand(3, 3, size, size)
        z = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(model(x), published_preact.forward(state, z), rtol=1e-4, atol=1e-4)
    assert model.stage_outputs(torch.rand(1, 3, 64, 64))["layer4"].shape == (1, 512, 8, 8)


def test_resnet18_stem_stride_follows_input_size():
    small = build_model("resnet18", 10, 32, MEAN, STD)
    large = build_model("resnet18", 10, 64, MEAN, STD)
    assert small.stem[0].stride == (1, 1) and large.stem[0].stride == (2, 2)
    assert large(torch.rand(1, 3, 64, 64)).shape == (1, 10)
    assert large.stage_outputs(torch.rand(1, 3, 64, 64))["layer4"].shape[-1] == 4


def test_mini_resnet_keeps_resnet18_topology():
    mini = build_model("mini_resnet", 10, 32, MEAN, STD)
    assert mini.stage_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert [len(getattr(mini, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert mini.stem[0].out_channels == 16 and mini.head.in_features == 128
    assert len(mini.conv_bn_pairs()) == 1 + 4 * 2 + 3  # stem, two per block, three projection shortcuts
