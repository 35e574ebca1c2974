"""Contract tests a plugin author runs on their own components, as `optuna.testing` ships its
storage tests: every registered attack, defense and dataset of bdlab passes these, on a tiny CPU
problem in seconds.

    # conftest.py of your project: the tiny digits problem the contracts run on
    pytest_plugins = ["trials.testing.fixtures"]

    # test_my_defense.py
    import pytest
    from trials.testing import DefenseContract

    class TestMyDefense(DefenseContract):
        @pytest.fixture
        def defense_name(self):
            return "my_defense"  # registered by your module, imported above

`AttackContract` asks for `attack_name` (and optionally `smoke_params`, `model_name`),
`DatasetContract` for `dataset_name` (and `dataset_root` where the dataset reads files).
"""

from trials.testing.attack import AttackContract
from trials.testing.dataset import DatasetContract
from trials.testing.defense import DefenseContract

__all__ = ["AttackContract", "DatasetContract", "DefenseContract"]
