"""Decoding image files into one uint8 array, in parallel threads (PIL releases the GIL)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def decode_images(paths: list[Path | str], size: tuple[int, int] | None) -> np.ndarray:
    """N paths -> N,H,W,3 uint8. `size` (H, W) resizes; None requires all images to share a size."""
    from PIL import Image

    def read(path: Path | str) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)

    workers = min(16, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(read, paths, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size {sorted(shapes)[:3]}...; set the dataset parameter size")
    return np.stack(arrays) if arrays else np.zeros((0, *(size or (32, 32)), 3), np.uint8)
