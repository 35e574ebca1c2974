"""Named parameter presets of the defenses, kept as data in `trials/defenses/presets/<defense>.yaml`
(package data: found the same way in a checkout and in an installed package).

Each file maps a preset name to parameter values, e.g. `cpu:` (a schedule sized for a 2-core CPU,
used by the tests and the demo). The papers' values stay the defenses' defaults; a preset only
overrides some of them, and `--param` values override the preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trials.errors import InvalidValue

PRESET_DIR = Path(__file__).resolve().parent / "defenses" / "presets"
# each defense's default Optuna search space (read and checked by bdlab.spaces; listed by `bdlab list`)
SPACE_DIR = Path(__file__).resolve().parent / "defenses" / "spaces"


def available_presets(defense: str) -> list[str]:
    path = PRESET_DIR / f"{defense}.yaml"
    if not path.exists():
        return []
    return sorted((yaml.safe_load(path.read_text()) or {}).keys())


def load_preset(defense: str, name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{defense}.yaml"
    presets = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if name not in presets:
        allowed = ", ".join(sorted(presets)) or f"none (no {path.name} under trials/defenses/presets)"
        raise InvalidValue("--preset", name, f"one of: {allowed}")
    return dict(presets[name] or {})


def default_space_params(defense: str) -> list[str]:
    """The parameters the defense's default search space varies (none when it has no space file)."""
    path = SPACE_DIR / f"{defense}.yaml"
    if not path.exists():
        return []
    return list((yaml.safe_load(path.read_text()) or {}).keys())
