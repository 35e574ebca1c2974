"""The dataset registry: every dataset (trials/data/<name>.py registers itself with @register_dataset)."""

from __future__ import annotations

from trials.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register
