from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs beside other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits():
    from trials.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_digits():
    """A few dozen digits images: enough for smoke tests of every component."""
    from trials.data import load_dataset

    return load_dataset("digits", {"train_subset": 40, "test_subset": 40})
