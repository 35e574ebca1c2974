from __future__ import annotations

from trials.registry import Registry

DEFENSES: Registry = Registry("defense")
register_defense = DEFENSES.register
