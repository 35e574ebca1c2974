"""The tracking schema: the experiments the platform writes to and every tag it sets, defined once.

Runs live in three kinds of experiments: `bdlab/<sweep>` (a sweep's parent run per generation, and
one child run per defense trial), `bdlab/attacked-models` (one run per attacked model, shared by
every sweep) and `bdlab/drivers` (the lease of the driver that runs a sweep). The README's "The
tracking schema" documents each tag; metric names come from `trials.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

ATTACK_EXPERIMENT = "bdlab/attacked-models"
DRIVER_EXPERIMENT = "bdlab/drivers"
SWEEP_EXPERIMENT_PREFIX = "bdlab/"


def sweep_experiment(sweep: str) -> str:
    """The experiment of sweep `sweep`: its parent runs and every trial's child run."""
    return f"{SWEEP_EXPERIMENT_PREFIX}{sweep}"


def experiment_tags(objectives: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags of an experiment the platform creates: opened on the runs table; a sweep's experiment
    (`objectives` given) also gets the saved view `RESULTS_VIEW`, whose columns are the objectives on
    both halves and the cell, sorted by the first objective's validation score."""
    import json

    tags = {EXPERIMENT_KIND: MODEL_TRAINING}
    if objectives:
        first, direction = next(iter(objectives.items()))
        state = {
            "orderByKey": f"metrics.`val_{first}`",
            "orderByAsc": direction == "min",
            "selectedColumns": [
                *(f"metrics.`{m}`" for m in objectives),
                *(f"metrics.`val_{m}`" for m in objectives),
                f"tags.`{DEFENSE}`",
                f"tags.`{CELL}`",
                f"tags.`{STATUS}`",
            ],
        }
        envelope = {"name": "bdlab: results", "createdAt": 0, "updatedAt": 0, "state": json.dumps(state)}
        tags[SAVED_VIEW_PREFIX + RESULTS_VIEW] = json.dumps(envelope)
    return tags


def sweep_names(experiment_names: list[str]) -> list[str]:
    """The sweeps among experiment names (the shared attacked-model and driver experiments aside)."""
    shared = (ATTACK_EXPERIMENT, DRIVER_EXPERIMENT)
    return sorted(
        n.removeprefix(SWEEP_EXPERIMENT_PREFIX)
        for n in experiment_names
        if n.startswith(SWEEP_EXPERIMENT_PREFIX) and n not in shared
    )


PARENT = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces); this value opens
# it on the runs table
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# a saved view of the runs table (MLflow >= 3.15 keeps views in experiment tags with this prefix and
# opens one with `?viewStateShareKey=<id>`): the sweep's objectives as columns
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."
RESULTS_VIEW = "bdlab-results"  # MLflow's own: nests a trial's run under its sweep's parent run

# what a run is and where it belongs
KIND = "bdlab.kind"  # sweep (a parent run), attack, driver
SWEEP = "bdlab.sweep"
GENERATION = "bdlab.generation"  # a sweep's generation (re-run with --fresh: the next one)
PHASE = "bdlab.phase"  # attack | defense
SPEC = "bdlab.spec"  # the sweep file a parent run was started from

# the cell a trial belongs to
DATASET = "bdlab.dataset"
MODEL = "bdlab.model"
ATTACK = "bdlab.attack"
DEFENSE = "bdlab.defense"
CELL = "bdlab.cell"  # the cell's human label
CACHE_KEY = "bdlab.cache_key"  # the attacked model's content address
CODE_VERSION = "bdlab.code_version"  # hash of the code that trained an attacked model
NUM_CLASSES = "bdlab.num_classes"  # an attacked model's classes (a collapsed defense sits at chance)

# a defense trial
STUDY = "bdlab.study"  # its Optuna study
TRIAL = "bdlab.trial"  # its Optuna trial number
DEFAULT = "bdlab.default"  # "true" for the cell's default configuration
STATUS = "bdlab.status"  # running | complete | failed
FAILURE = "bdlab.failure"  # the reason of a trial that failed for good
EARLIER_FAILURE = "bdlab.earlier_failure"  # the reason of a failed attempt that a retry completed
ATTEMPT = "bdlab.attempt"  # 1 for a trial's first run; more when Ray retried it or a driver resumed it

# a study trial (a defense entry with `study:`, docs/spec.md "Studies"); absent on search trials
DESIGN = "bdlab.design"  # sobol | grid
CONFIGURATION = "bdlab.configuration"  # the configuration's index in the design (0: the default)
DEFENSE_SEED = "bdlab.defense_seed"  # the defense seed the trial ran with
DATA_FRACTION = "bdlab.data_fraction"  # the clean-data budget (only when the study sets budgets)
DATA_SUBSET = "bdlab.data_subset"  # which random subset of the held-out data the trial got

# where a trial (or an attacked model's training) ran: set by the worker as it starts, so a retry on
# another node overwrites them with the node that finished the work
HOST = "bdlab.host"  # also the host of a claim's holder
RAY_NODE = "bdlab.ray_node"  # the Ray node id
DEVICE = "bdlab.device"  # cpu | cuda:N
GPU = "bdlab.gpu"  # the GPU's name ("" on a CPU)
GPU_MEMORY = "bdlab.gpu_memory_gb"  # its total memory
TORCH = "bdlab.torch"  # torch.__version__
CUDA = "bdlab.cuda"  # the CUDA version torch was built with ("" for a CPU build)

# claims (bdlab.claims): one process does a piece of work
CLAIM = "bdlab.claim"
HEARTBEAT = "bdlab.heartbeat"  # epoch seconds of the holder's last sign of life
PID = "bdlab.pid"
STALE = "bdlab.stale"  # why a dead claim was ended


# --- metric names ----------------------------------------------------------------------------------
# A trial's metrics (trials.run: the report half at the top, "val" and "before" inside) are stored
# flat: `acc` (report half), `val_acc` (validation half), `before_acc` (the backdoored model), plus
# the trial's own numbers (`seconds`, a defense's findings are not metrics). Every metric of
# `trials.metrics` (`defense_metric_keys`: the registered ones and a defense's `der`) flows through
# here to MLflow, the Parquet table and the summaries.


def finite_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a flat mapping (None, booleans, NaN and non-numbers dropped)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def flat_trial_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = finite_numbers({k: v for k, v in metrics.items() if k not in ("val", "before", "findings")})
    out.update(finite_numbers(metrics.get("val", {}), "val_"))
    if "before" in metrics:
        out.update(finite_numbers({k: v for k, v in metrics["before"].items() if k != "val"}, "before_"))
    return out


def metric_columns() -> list[str]:
    """The stored names of every metric of a defense trial (the registered metrics, then the
    defense-only ones such as `der`): report half, then validation half."""
    from trials.metrics import defense_metric_keys

    keys = defense_metric_keys()
    return [*keys, *(f"val_{k}" for k in keys)]
