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


# Named training recipes for `bdlab attack --recipe-preset NAME` (docs/evaluation.md#recipe-presets):
# each sets TrainRecipe fields (`recipe:`) and dataset parameters (`dataset_params:`, e.g. a training
# subset); the dataset's own recipe is the base, and --recipe / --epochs / --dataset-param override.
RECIPE_PRESETS = Path(__file__).resolve().parent / "recipe_presets.yaml"
_RECIPE_PRESET_KEYS = {"description", "datasets", "recipe", "dataset_params"}


def recipe_presets() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(RECIPE_PRESETS.read_text()) or {}


def load_recipe_preset(name: str, dataset: str) -> dict[str, Any]:
    """The preset `name` as {"recipe": {...}, "dataset_params": {...}}, checked against `dataset`."""
    presets = recipe_presets()
    if name not in presets:
        raise InvalidValue("--recipe-preset", name, f"one of: {', '.join(sorted(presets))}")
    preset = presets[name] or {}
    unknown = set(preset) - _RECIPE_PRESET_KEYS
    if unknown:  # a typo in the package's own file: fail loudly rather than drop it
        raise InvalidValue(
            f"recipe preset {name}", sorted(unknown), f"keys among {sorted(_RECIPE_PRESET_KEYS)}"
        )
    datasets = preset.get("datasets")
    if datasets and dataset not in datasets:
        raise InvalidValue("--recipe-preset", name, f"a preset for the datasets {', '.join(datasets)}")
    return {
        "recipe": dict(preset.get("recipe") or {}),
        "dataset_params": dict(preset.get("dataset_params") or {}),
    }
