"""Named parameter presets of the defenses, kept as data in `search_spaces/presets/<defense>.yaml`.

Each file maps a preset name to parameter values, e.g. `cpu:` (a schedule sized for a 2-core CPU,
used by the tests and the demo). The papers' values stay the defenses' defaults; a preset only
overrides some of them, and `--param` values override the preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trials.errors import InvalidValue

PRESET_DIR = Path(__file__).resolve().parent.parent / "search_spaces" / "presets"


def available_presets(defense: str) -> list[str]:
    path = PRESET_DIR / f"{defense}.yaml"
    if not path.exists():
        return []
    return sorted((yaml.safe_load(path.read_text()) or {}).keys())


def load_preset(defense: str, name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{defense}.yaml"
    presets = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if name not in presets:
        allowed = ", ".join(sorted(presets)) or f"none (no {path.name} under search_spaces/presets)"
        raise InvalidValue("--preset", name, f"one of: {allowed}")
    return dict(presets[name] or {})
