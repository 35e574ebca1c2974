"""The defense registry: every defense (trials/defenses/<name>.py registers itself with @register_defense)."""

from __future__ import annotations

from trials.registry import Registry

DEFENSES: Registry = Registry("defense")
register_defense = DEFENSES.register
