"""Defenses (registry), one file each. See `base.Defense` for the contract.

Every module of this package is imported here, so a new defense file registers itself: add
`trials/defenses/<name>.py` with `@register_defense("<name>")` and it is listed, tested by the
contract tests and usable from `bdlab defend` and sweeps.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from trials.defenses.base import DATA_KINDS, PRECISIONS, Defense, DefenseContext, DefenseData
from trials.defenses.registry import DEFENSES, register_defense
from trials.params import resolve_params

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DATA_KINDS",
    "DEFENSES",
    "PRECISIONS",
    "Defense",
    "DefenseContext",
    "DefenseData",
    "make_defense",
    "register_defense",
]


def make_defense(name: str, params: dict[str, Any] | None) -> Defense:
    cls = DEFENSES.get(name)
    return cls(resolve_params(cls.Params, params, owner=f"defense {name}"))
