from __future__ import annotations

import pytest

from trials.errors import InvalidValue
from trials.registry import Registry


def test_duplicate_is_an_error_and_unknown_lists_valid_names():
    reg: Registry = Registry("widget")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(type("B", (), {}))
    assert A.name == "a"
    with pytest.raises(InvalidValue, match="widget: 'zzz' is not allowed; registered: a"):
        reg.get("zzz")


def test_every_family_is_populated():
    from trials.attacks import ATTACKS
    from trials.data import DATASETS
    from trials.models import MODELS

    assert {"digits", "cifar10", "cifar100", "gtsrb", "imagefolder"} <= set(DATASETS.names())
    assert {
        "resnet18",
        "preact_resnet18",
        "resnet34",
        "wrn40_1",
        "wrn40_2",
        "vgg16_bn",
        "mini_resnet",
    } <= set(MODELS.names())
    assert {"badnets", "blended", "sig", "label_consistent", "trojannn", "wanet"} <= set(ATTACKS.names())


def test_attack_key_equals_file_name():
    import sys

    from trials.attacks import ATTACKS

    for name, cls in ATTACKS.items():
        assert sys.modules[cls.__module__].__name__.rsplit(".", 1)[-1] == name
