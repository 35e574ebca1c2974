"""Contract every registered attack passes (trials.testing, the same contract a plugin's attack
runs), with a one-epoch run of every attack x model pair."""

from __future__ import annotations

import pytest

from trials.attacks import ATTACKS
from trials.models import MODELS
from trials.testing import AttackContract

# Smoke runs check that every pair runs, not the attack's strength: shorten the inner optimizations
# (their full budgets are exercised in test_attack_quality.py).
SMOKE_PARAMS = {"trojannn": {"steps": 2, "batch": 8}, "label_consistent": {"steps": 2}}


class TestEveryAttack(AttackContract):
    @pytest.fixture(params=ATTACKS.names())
    def attack_name(self, request):
        return request.param

    @pytest.fixture
    def smoke_params(self, attack_name):
        return SMOKE_PARAMS.get(attack_name, {})

    @pytest.fixture(params=MODELS.names())
    def model_name(self, request):
        return request.param
