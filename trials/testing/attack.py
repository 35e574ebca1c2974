"""The contract of an attack: it poisons a training set keeping indices and labels, stamps a pure,
bounded, restorable trigger, renders it, and trains a model with every registered architecture."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trials.attacks import AttackContext, make_attack
from trials.run import AttackSpec, run_attack
from trials.training import TrainRecipe

SMOKE_DATA = {"train_subset": 20, "test_subset": 20}


def _ctx(data: Any) -> AttackContext:
    recipe = TrainRecipe(epochs=1, batch_size=20, crop_pad=0, flip=False)
    return AttackContext(data, "mini_resnet", recipe, torch.Generator().manual_seed(0), amp=False)


class AttackContract:
    """Give `attack_name`; `smoke_params` shortens inner optimizations (their full budgets belong in
    quality tests); `model_name` is the architecture of the one-epoch run. Needs `tiny_digits`."""

    @pytest.fixture
    def attack_name(self) -> str:
        raise NotImplementedError("a subclass names the registered attack under test")

    @pytest.fixture
    def smoke_params(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def model_name(self) -> str:
        return "mini_resnet"

    def test_poison_keeps_indices_and_labels(
        self, attack_name: str, smoke_params: dict[str, Any], tiny_digits: Any
    ) -> None:
        data = tiny_digits
        attack = make_attack(attack_name, smoke_params, data.num_classes, data.image_shape, 0)
        ctx = _ctx(data)
        attack.setup(ctx)
        poisoned = attack.poison(data.train_x, data.train_y, ctx)
        assert poisoned.images.dtype == torch.uint8 and poisoned.images.shape == data.train_x.shape
        assert len(poisoned.index) > 0 and len(poisoned.index) == len(poisoned.original_labels)
        untouched = torch.ones(len(data.train_y), dtype=torch.bool)
        untouched[poisoned.index] = False
        assert torch.equal(poisoned.images[untouched], data.train_x[untouched])
        assert torch.equal(poisoned.labels[untouched], data.train_y[untouched])
        assert torch.equal(poisoned.original_labels, data.train_y[poisoned.index])
        if attack.clean_label:
            assert torch.equal(poisoned.labels[poisoned.index], data.train_y[poisoned.index])
            assert torch.all(data.train_y[poisoned.index] == attack.params.target)
        else:
            assert torch.all(poisoned.labels[poisoned.index] == attack.params.target)

    def test_apply_is_pure_bounded_and_restorable(
        self, attack_name: str, smoke_params: dict[str, Any], tiny_digits: Any
    ) -> None:
        data = tiny_digits
        attack = make_attack(attack_name, smoke_params, data.num_classes, data.image_shape, 0)
        attack.setup(_ctx(data))
        x = data.val_x[:6].float() / 255
        x_copy = x.clone()
        out = attack.apply(x)
        assert out.shape == x.shape and torch.equal(x, x_copy)
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out, x), "the trigger must change the images"
        image = attack.render_trigger()
        assert image.shape == data.image_shape and image.min() >= 0 and image.max() <= 1
        # a fresh instance with the saved state stamps exactly the same trigger
        fresh = make_attack(attack_name, smoke_params, data.num_classes, data.image_shape, 0)
        fresh.load_state(attack.state())
        torch.testing.assert_close(fresh.apply(x), out)
        if attack.patch_trigger:
            for preset in ("x4", "x5", "x9"):
                assert attack.apply_amplified(x, preset).shape == x.shape

    def test_one_epoch_smoke(self, attack_name: str, smoke_params: dict[str, Any], model_name: str) -> None:
        spec = AttackSpec(
            dataset="digits",
            model=model_name,
            attack=attack_name,
            dataset_params=SMOKE_DATA,
            attack_params=smoke_params,
            epochs=1,
            recipe={"batch_size": 10},
            device="cpu",
        )
        records: list[dict[str, Any]] = []
        result = run_attack(spec, progress=records.append)
        assert any(r["phase"] == "attack" for r in records)
        m = result.metrics
        assert 0 <= m["acc"] <= 1 and 0 <= m["asr"] <= 1 and "val" in m
        assert result.spec["attack"]["name"] == attack_name
