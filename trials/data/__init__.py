"""Datasets (registry) and the tensor-resident data path."""

from __future__ import annotations

from typing import Any

import torch

from trials.data import cifar, digits, gtsrb, imagefolder  # noqa: F401  (registration)
from trials.data.base import Dataset, ImageData, SplitParams
from trials.data.registry import DATASETS, register_dataset
from trials.errors import InvalidValue
from trials.params import resolve_params

__all__ = [
    "DATASETS",
    "Dataset",
    "ImageData",
    "SplitParams",
    "load_dataset",
    "register_dataset",
    "make_dataset",
    "resolve_dataset_params",
]


def resolve_dataset_params(name: str, params: dict[str, Any] | None = None) -> tuple[SplitParams, Any]:
    """(split parameters, the dataset's own parameters) from `params`, which mixes both; every
    name and value checked. Nothing is built or read."""
    cls = DATASETS.get(name)
    params = dict(params or {})
    split_keys = set(SplitParams.__dataclass_fields__)
    known = split_keys | set(cls.Params.__dataclass_fields__)
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidValue(
            f"dataset {name}: param", unknown[0], f"valid parameters are: {', '.join(sorted(known))}"
        )
    split = resolve_params(
        SplitParams, {k: v for k, v in params.items() if k in split_keys}, owner=f"dataset {name}"
    )
    own = resolve_params(
        cls.Params, {k: v for k, v in params.items() if k not in split_keys}, owner=f"dataset {name}"
    )
    return split, own


def make_dataset(name: str, params: dict[str, Any] | None = None, root: str | None = None) -> Dataset:
    """Resolve a dataset by name; `params` mixes the dataset's own and the shared split parameters."""
    split, own = resolve_dataset_params(name, params)
    return DATASETS.get(name)(own, split, root)


def load_dataset(
    name: str,
    params: dict[str, Any] | None = None,
    root: str | None = None,
    device: torch.device | str = "cpu",
) -> ImageData:
    return make_dataset(name, params, root).load(device)
