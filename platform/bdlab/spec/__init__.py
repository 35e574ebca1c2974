"""Sweep specs: the data model (`model`), reading and validating a sweep file (`reader`), and grids of
typed values (`grid`). `from bdlab.spec import load_sweep` is all a caller needs.
"""

from bdlab.spec.grid import expand_grid
from bdlab.spec.model import (
    AttackCell,
    DefenseCell,
    DefenseEntry,
    FailurePolicy,
    Resources,
    SamplerSettings,
    StudyDesign,
    SweepSpec,
    TrialResources,
)
from bdlab.spec.reader import load_sweep, parse_sweep

__all__ = [
    "AttackCell",
    "DefenseCell",
    "DefenseEntry",
    "FailurePolicy",
    "Resources",
    "SamplerSettings",
    "StudyDesign",
    "SweepSpec",
    "TrialResources",
    "expand_grid",
    "load_sweep",
    "parse_sweep",
]
