"""Named training recipes (trials/recipe_presets.yaml): what `--recipe-preset` resolves to, and the
order in which the dataset's recipe, the preset and the user's own values apply."""

from __future__ import annotations

import pytest

from trials.errors import InvalidValue
from trials.presets import load_recipe_preset, recipe_presets
from trials.run import AttackSpec, resolve_recipe
from trials.run.attack import dataset_params
from trials.training import TrainRecipe


def test_cifar_cpu_turns_the_crop_off_and_takes_a_subset():
    preset = load_recipe_preset("cifar_cpu", "cifar10")
    spec = AttackSpec(dataset="cifar10", recipe_preset="cifar_cpu")
    recipe = resolve_recipe(spec)
    assert recipe.crop_pad == 0  # the point of the preset: an unshifted patch is learnt on a CPU budget
    assert recipe.epochs == preset["recipe"]["epochs"] < TrainRecipe().epochs
    assert recipe.lr == TrainRecipe().lr  # fields the preset does not name keep the dataset's recipe
    assert dataset_params(spec) == preset["dataset_params"]
    assert dataset_params(spec)["train_subset"] > 0


def test_the_users_values_override_the_preset():
    spec = AttackSpec(
        dataset="imagefolder",
        recipe_preset="cifar_cpu",
        recipe={"crop_pad": 2},
        epochs=1,
        dataset_params={"train_subset": 500},
    )
    recipe = resolve_recipe(spec)
    assert (recipe.crop_pad, recipe.epochs) == (2, 1)
    assert recipe.schedule == load_recipe_preset("cifar_cpu", "imagefolder")["recipe"]["schedule"]
    assert dataset_params(spec)["train_subset"] == 500


def test_no_preset_is_the_datasets_recipe():
    assert resolve_recipe(AttackSpec(dataset="digits")) == TrainRecipe(
        epochs=30, batch_size=128, lr=0.05, crop_pad=2, flip=False
    )


def test_unknown_preset_and_wrong_dataset_are_refused():
    with pytest.raises(InvalidValue, match="one of: cifar_cpu"):
        load_recipe_preset("nope", "cifar10")
    with pytest.raises(InvalidValue, match="'cifar_cpu'.*cifar10, imagefolder"):
        resolve_recipe(AttackSpec(dataset="digits", recipe_preset="cifar_cpu"))


def test_every_preset_resolves():
    for name, preset in recipe_presets().items():
        for dataset in preset.get("datasets") or ["digits"]:
            resolve_recipe(AttackSpec(dataset=dataset, recipe_preset=name))  # every field is a real one
