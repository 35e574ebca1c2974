"""Defenses (registry), one file each. The erasers and baselines register here as they land."""

from __future__ import annotations

from trials.defenses.registry import DEFENSES, register_defense

__all__ = ["DEFENSES", "register_defense"]
