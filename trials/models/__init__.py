"""Architectures (registry). Every model is an `ImageClassifier`: Normalize inside, named stages."""

from __future__ import annotations

from trials.models import preact_resnet, resnet, vgg, wide_resnet  # noqa: F401  (registration)
from trials.models.base import ImageClassifier, Normalize
from trials.models.registry import MODELS, register_model

__all__ = ["MODELS", "ImageClassifier", "Normalize", "build_model", "register_model"]


def build_model(
    name: str, num_classes: int, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> ImageClassifier:
    return MODELS.get(name)(num_classes, image_size, tuple(mean), tuple(std))
