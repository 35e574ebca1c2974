"""Any `root/train/<class>/*` and `root/test/<class>/*` tree of image files.

For Tiny-ImageNet, Mini-ImageNet, VGGFace2 subsets, or CIFAR-10 stored as JPEG files
(docs/datasets.md).
Class indices follow the sorted class-folder names of `train/`; `test/` may not name other classes.
Decoded arrays are cached (keyed by the tree's file list, sizes and mtimes) so a second load of a
60,000-image tree takes about a second instead of a minute.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trials.data.base import Dataset, RawImages, require_root
from trials.data.images import IMAGE_SUFFIXES, decode_images
from trials.data.registry import register_dataset
from trials.errors import InvalidValue
from trials.params import param


@dataclass(frozen=True)
class ImageFolderParams:
    size: int = param(
        0, "resize images to size x size; 0 keeps their size (all must agree)", low=0, high=1024
    )
    flip: bool = param(True, "horizontal flip is a valid augmentation for these images")
    cache: bool = param(True, "cache the decoded arrays under ~/.cache/bdlab (or $BDLAB_CACHE)")


@register_dataset("imagefolder")
class ImageFolder(Dataset):
    Params = ImageFolderParams

    def __init__(self, params, split, root) -> None:
        super().__init__(params, split, root)
        self.flip = params.flip

    def load_raw(self) -> RawImages:
        root = Path(require_root(self.root, self.name, "train/<class>/* and test/<class>/* image files"))
        train_files, classes = _scan(root / "train", None)
        test_files, _ = _scan(root / "test", classes)
        size = (self.params.size, self.params.size) if self.params.size else None
        cache = _cache_path(root, train_files + test_files, size) if self.params.cache else None
        if cache is not None and cache.exists():
            with np.load(cache) as z:
                return RawImages(z["train_x"], z["train_y"], z["test_x"], z["test_y"], list(classes))
        raw = RawImages(
            train_x=decode_images([p for p, _ in train_files], size),
            train_y=np.array([y for _, y in train_files], dtype=np.int64),
            test_x=decode_images([p for p, _ in test_files], size),
            test_y=np.array([y for _, y in test_files], dtype=np.int64),
            class_names=list(classes),
        )
        if cache is not None:
            _write_cache(cache, raw)
        return raw


def _write_cache(cache: Path, raw: RawImages) -> None:
    """Write the decoded arrays atomically. The temporary file is this writer's own: two processes
    that decode the same folder at once (two attack trials of a sweep on one node) would otherwise
    write one temporary name, and the second rename would find it gone."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{cache.stem}.", suffix=".npz", dir=cache.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_x=raw.train_x, train_y=raw.train_y, test_x=raw.test_x, test_y=raw.test_y)
        os.replace(name, cache)  # the last writer wins; the arrays are the same
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    if not folder.is_dir():
        raise InvalidValue(
            "--data-root", str(folder.parent), f"imagefolder needs a subfolder {folder.name}/<class>/"
        )
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        extra = sorted(set(found) - set(classes))[0]
        raise InvalidValue("--data-root", str(folder), f"test class {extra!r} is not a training class")
    if not classes:
        raise InvalidValue("--data-root", str(folder), "no class folders found")
    index = {c: i for i, c in enumerate(classes)}
    files = [
        (p, index[c])
        for c in found
        for p in sorted((folder / c).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise InvalidValue("--data-root", str(folder), "no image files found")
    return files, classes


def _cache_path(root: Path, files: list[tuple[Path, int]], size: tuple[int, int] | None) -> Path:
    digest = hashlib.sha256(f"{root.resolve()}|{size}".encode())
    for path, label in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    base = Path(os.environ.get("BDLAB_CACHE", Path.home() / ".cache" / "bdlab"))
    return base / "imagefolder" / f"{digest.hexdigest()[:24]}.npz"
