"""The attack registry: every attack (trials/attacks/<name>.py registers itself with @register_attack)."""

from __future__ import annotations

from trials.registry import Registry

ATTACKS: Registry = Registry("attack")
register_attack = ATTACKS.register
