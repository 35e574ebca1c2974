"""scikit-learn's bundled handwritten digits: the embedded default dataset, no download.

1,797 grayscale 8x8 images (17 gray levels, 0-16) of the digits 0-9, upsampled to 32x32 and repeated on
three channels, so every CIFAR-sized model and trigger applies unchanged. A fixed, seeded,
stratified 80/20 split gives 1,437 training and 360 test images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from trials.data.base import Dataset, RawImages, stratified_sample
from trials.data.registry import register_dataset

SIZE = 32
TEST_FRACTION = 0.2
TRAIN_TEST_SEED = 0  # fixed: the train/test split is part of the dataset's definition


@register_dataset("digits")
class Digits(Dataset):
    flip = False  # a mirrored digit is a different (or no) digit
    needs_root = False
    # 1,293 images: 30 epochs of 10 steps train mini_resnet to ~99 % in well under a minute on 2 cores
    recipe = {"epochs": 30, "batch_size": 128, "lr": 0.05, "crop_pad": 2, "flip": False}

    def load_raw(self) -> RawImages:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # N,1,8,8 in [0,1]
        big = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).numpy()
        labels = bunch.target.astype(np.int64)
        n_test = math.ceil(TEST_FRACTION * len(labels))  # 360 of 1,797, as sklearn's train_test_split
        test = stratified_sample(labels, n_test, np.random.default_rng(TRAIN_TEST_SEED))
        train = np.setdiff1d(np.arange(len(labels)), test)
        return RawImages(
            train_x=pixels[train],
            train_y=labels[train],
            test_x=pixels[test],
            test_y=labels[test],
            class_names=[str(d) for d in range(10)],
        )
