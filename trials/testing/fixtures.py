"""Pytest fixtures of the contracts (`pytest_plugins = ["trials.testing.fixtures"]`): the tiny digits
problem, shared by the whole session."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_digits() -> Any:
    """A few dozen digits images: enough for smoke tests of every component."""
    from trials.data import load_dataset

    return load_dataset("digits", {"train_subset": 40, "test_subset": 40})


@pytest.fixture(scope="session")
def tiny_attacked(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A BadNets mini_resnet on tiny digits, trained one epoch and saved as an attacked-model folder."""
    from trials.run import AttackSpec, load_attacked, run_attack, save_attack_result

    spec = AttackSpec(
        attack_params={"ratio": 0.2},
        dataset_params={"train_subset": 60, "test_subset": 40},
        epochs=1,
        device="cpu",
    )
    folder = save_attack_result(run_attack(spec), tmp_path_factory.mktemp("attacked") / "badnets")
    return load_attacked(folder, "cpu")
