"""Attacks (registry), one file each. See `base.Attack` for the contract."""

from __future__ import annotations

from typing import Any

from trials.attacks import badnets, blended, label_consistent, sig, trojannn, wanet  # noqa: F401  (registration)
from trials.attacks.base import Attack, AttackContext, PoisonedSet
from trials.attacks.registry import ATTACKS, register_attack
from trials.params import resolve_params

__all__ = ["ATTACKS", "Attack", "AttackContext", "PoisonedSet", "make_attack", "register_attack"]


def make_attack(
    name: str, params: dict[str, Any] | None, num_classes: int, image_shape: tuple[int, int, int], seed: int
) -> Attack:
    cls = ATTACKS.get(name)
    return cls(resolve_params(cls.Params, params, owner=f"attack {name}"), num_classes, image_shape, seed)
