from __future__ import annotations

import numpy as np
import pytest
import torch

from trials.data import DATASETS, load_dataset, make_dataset
from trials.data.base import stratified_halves, stratified_sample
from trials.errors import BdlabError, InvalidValue
from trials.testing import DatasetContract


class TestEveryDataset(DatasetContract):
    """The contract for every registered dataset; imagefolder loads from a tiny tree written here,
    the torchvision sets (which need their files) are checked for their error."""

    @pytest.fixture(params=DATASETS.names())
    def dataset_name(self, request):
        return request.param

    @pytest.fixture
    def dataset_root(self, dataset_name, tmp_path, monkeypatch):
        if dataset_name != "imagefolder":
            return None
        monkeypatch.setenv("BDLAB_CACHE", str(tmp_path / "cache"))
        _write_tree(tmp_path / "data", per_class=12)
        return str(tmp_path / "data")


def test_digits_shapes_and_sizes(digits):
    assert digits.image_shape == (3, 32, 32)
    assert digits.train_x.dtype == torch.uint8
    # 1,797 images: 360 test (ceil 20 %), 1,437 training of which 10 % (144) held out from the attacker
    assert digits.train_split_size == 1437
    assert len(digits.train_y) == 1293 and len(digits.heldout_y) == 144
    assert len(digits.val_y) == 180 and len(digits.report_y) == 180
    assert digits.num_classes == 10 and digits.flip is False
    # the three channels are copies of the grayscale image
    assert torch.equal(digits.train_x[:, 0], digits.train_x[:, 1])


def test_splits_are_fixed_and_disjoint(digits):
    again = load_dataset("digits")
    assert torch.equal(again.val_x, digits.val_x) and torch.equal(again.heldout_x, digits.heldout_x)
    flat = lambda x: {bytes(row) for row in x.flatten(1).numpy()}  # noqa: E731
    # no held-out image is in the attacker's training set (digits has a few exact duplicates; allow them)
    overlap = flat(digits.heldout_x) & flat(digits.train_x)
    assert len(overlap) <= 2
    assert not (flat(digits.val_x) & flat(digits.report_x)) - (flat(digits.val_x) & flat(digits.train_x))


def test_validation_and_report_halves_are_stratified(digits):
    diff = torch.bincount(digits.val_y, minlength=10) - torch.bincount(digits.report_y, minlength=10)
    assert diff.abs().max() <= 1


def test_stratified_helpers_by_hand():
    labels = np.array([0] * 6 + [1] * 4)
    a, b = stratified_halves(labels, np.random.default_rng(0))
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(10))
    assert (labels[a] == 0).sum() == 3 and (labels[a] == 1).sum() == 2
    pick = stratified_sample(labels, 5, np.random.default_rng(0))
    assert len(pick) == 5 and (labels[pick] == 0).sum() == 3 and (labels[pick] == 1).sum() == 2


def test_subsets(tiny_digits):
    assert len(tiny_digits.train_y) == 40
    assert len(tiny_digits.val_y) + len(tiny_digits.report_y) == 40


def _write_tree(root, sizes=(8, 8), classes=("cat", "dog"), per_class=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (*sizes, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")


def test_imagefolder_reads_a_tree_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("BDLAB_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path / "data")
    data = load_dataset("imagefolder", {"heldout_fraction": 0.25}, root=str(tmp_path / "data"))
    assert data.class_names == ["cat", "dog"]
    assert data.image_shape == (3, 8, 8)
    assert data.train_split_size == 12 and len(data.heldout_y) == 3
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1
    again = load_dataset("imagefolder", {"heldout_fraction": 0.25}, root=str(tmp_path / "data"))
    assert torch.equal(again.train_x, data.train_x)
    resized = load_dataset("imagefolder", {"size": 16, "cache": False}, root=str(tmp_path / "data"))
    assert resized.image_shape == (3, 16, 16)


def test_imagefolder_cache_survives_two_first_loads_at_once(tmp_path, monkeypatch):
    """Two loaders that decode the same uncached folder together (two attack trials of a sweep on
    one node) both finish, and leave one cache file: each writes its own temporary file. The writes
    are held at a barrier, so both are written before either is renamed (the case that failed)."""
    import threading

    monkeypatch.setenv("BDLAB_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path / "data")
    both_written = threading.Barrier(2, timeout=30)
    savez = np.savez

    def savez_then_wait(*args, **kwargs):
        savez(*args, **kwargs)
        both_written.wait()

    monkeypatch.setattr(np, "savez", savez_then_wait)
    loaded, failed = [], []

    def load():
        try:
            loaded.append(load_dataset("imagefolder", root=str(tmp_path / "data")))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            failed.append(err)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failed == [] and len(loaded) == 2
    assert torch.equal(loaded[0].train_x, loaded[1].train_x)
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(left) == 1 and left[0].endswith(".npz") and not left[0].startswith("."), left


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "gtsrb", "imagefolder"])
def test_missing_root_is_a_clear_error(name, tmp_path):
    with pytest.raises(InvalidValue, match="--data-root") as err:
        load_dataset(name, root=str(tmp_path / "nope"))
    assert "\n" not in str(err.value)
    with pytest.raises(InvalidValue, match="--data-root"):
        load_dataset(name, root=None)


def test_empty_root_for_torchvision_sets_says_how_to_download(tmp_path):
    with pytest.raises(BdlabError, match="download=true"):
        load_dataset("cifar10", root=str(tmp_path))


def test_unknown_dataset_param_lists_shared_and_own():
    with pytest.raises(InvalidValue, match="heldout_fraction"):
        make_dataset("digits", {"bogus": 1})
