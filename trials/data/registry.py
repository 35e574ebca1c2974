from __future__ import annotations

from trials.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register
