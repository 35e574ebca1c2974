"""What the driver hands a Ray Tune trial: typed, frozen configurations, turned into plain JSON-able
dicts at the boundary (`as_tune`) and rebuilt on the worker (`from_tune`).

Tune sees only the plain dict (its `param_space` and searcher speak dicts, and a trial's config is
shown in its logs); everything on either side of it reads typed fields, so a misspelt key is an
AttributeError at once, not a silent None in a trial.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bdlab.spec.model import AttackCell, TrialResources
from bdlab.tracking import Store

C = TypeVar("C")


@dataclass(frozen=True)
class AttackTrialConfig:
    """Phase 1: train (or find trained by another process) the attacked model of one cell."""

    cell: AttackCell
    key: str  # the cell's content address
    store: Store
    sweep: str
    device: str
    resources: TrialResources
    plugins: list[str] = field(default_factory=list)  # modules to import first (extra components)


@dataclass(frozen=True)
class DefenseTrialConfig:
    """Phase 2: one defense trial of one cell's study, logged into its MLflow child run."""

    study: str
    number: int  # the Optuna trial number
    default: bool  # the cell's default configuration
    resumed: bool  # left RUNNING by an earlier driver
    defense: str
    params: dict[str, Any]  # every override of the defense's defaults (preset and sampled values)
    cell_label: str
    attacked_run_id: str
    attacked_cache: str  # where attacked-model folders are downloaded on the worker
    checkpoint_dir: str
    store: Store
    experiment_id: str
    parent_run_id: str
    objectives: list[str]
    seed: int  # the defense seed
    device: str
    resources: TrialResources
    tags: dict[str, str]
    plugins: list[str] = field(default_factory=list)
    # a study trial's held-out subset seed (bdlab.designs.subset_seed); None: drawn from `seed`
    data_seed: int | None = None
    mlflow_run_id: str | None = None  # opened by the driver as it hands the trial out
    checkpoint_every_s: float = 600.0


def as_tune(config: Any) -> dict[str, Any]:
    """A config as the plain dict Tune carries (paths as strings)."""
    return _plain(dataclasses.asdict(config))


def from_tune(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config (and the dataclasses inside it) from its plain dict."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _typed(hints[f.name], data[f.name])
    return cls(**values)


def _typed(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_tune(hint, value)
    if hint is Path:
        return Path(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
