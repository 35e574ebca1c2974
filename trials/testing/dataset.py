"""The contract of a dataset: it says whether it reads files, refuses a missing root in one line,
and loads into the shared splits (attacker training set, held-out part, validation and report
halves): uint8 NCHW images on the device, labels in range, stratified halves, and the same split on
every load."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trials.data import DATASETS, load_dataset
from trials.errors import InvalidValue

SMALL = {"train_subset": 40, "test_subset": 40, "heldout_fraction": 0.2}


class DatasetContract:
    """Give `dataset_name`, and `dataset_root` (a folder in the dataset's format) where it reads
    files; without a root, a dataset that needs one is checked for its error only."""

    @pytest.fixture
    def dataset_name(self) -> str:
        raise NotImplementedError("a subclass names the registered dataset under test")

    @pytest.fixture
    def dataset_root(self) -> str | None:
        return None

    def test_a_missing_root_is_one_line_naming_the_flag(self, dataset_name: str, tmp_path: Any) -> None:
        if not DATASETS.get(dataset_name).needs_root:
            load_dataset(dataset_name, dict(SMALL), root=None)  # embedded data: no root needed
            return
        for root in (None, str(tmp_path / "nope")):
            with pytest.raises(InvalidValue, match="--data-root") as err:
                load_dataset(dataset_name, dict(SMALL), root=root)
            assert "\n" not in str(err.value)

    def test_loads_the_shared_splits(self, dataset_name: str, dataset_root: str | None) -> None:
        if DATASETS.get(dataset_name).needs_root and dataset_root is None:
            pytest.skip(f"{dataset_name} reads files: give a dataset_root to test loading")
        data = load_dataset(dataset_name, dict(SMALL), root=dataset_root)
        parts = {
            "train": (data.train_x, data.train_y),
            "heldout": (data.heldout_x, data.heldout_y),
            "val": (data.val_x, data.val_y),
            "report": (data.report_x, data.report_y),
        }
        for name, (x, y) in parts.items():
            assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3, name
            assert tuple(x.shape[1:]) == data.image_shape and len(x) == len(y), name
            assert y.dtype == torch.int64 and (len(y) == 0 or 0 <= int(y.min()) <= int(y.max()) < data.num_classes)
        assert len(data.class_names) == data.num_classes
        assert len(data.heldout_y) == round(0.2 * data.train_split_size)
        assert len(data.train_y) <= 40 and len(data.val_y) + len(data.report_y) <= 40
        diff = torch.bincount(data.val_y, minlength=data.num_classes) - torch.bincount(
            data.report_y, minlength=data.num_classes
        )
        assert diff.abs().max() <= 1  # stratified halves
        assert len(data.mean) == len(data.std) == 3 and all(s > 0 for s in data.std)
        again = load_dataset(dataset_name, dict(SMALL), root=dataset_root)
        for a, b in ((data.train_x, again.train_x), (data.heldout_x, again.heldout_x), (data.val_x, again.val_x)):
            assert torch.equal(a, b)  # the split is part of the dataset's definition: seeded, fixed
