"""What a Ray worker runs for a sweep: one attack cell (phase 1) or one defense trial (phase 2).

A trial gets everything it needs in its typed config (`bdlab.trial_config`): the store, the cell,
the parameters, the MLflow parent run. It logs through the tracking interface only, so a worker on
another node needs no shared filesystem. Checkpoints of long defenses go where the sweep's
`checkpoints` option says: a folder every node mounts (NFS) or an `s3://` URI (`bdlab.checkpoints`),
so a trial moved to another node resumes there; by default under the results folder (one machine).
Each run is tagged with where it ran (`placement_tags`).

Failures are recorded where the team looks: the MLflow run is tagged `bdlab.failure` with the
reason and ended FAILED, then the exception propagates so Ray's failure policy retries the trial.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ray import tune

from bdlab.cache import claim_attacked, fetch_attacked, log_attacked
from bdlab.checkpoints import CheckpointPlace
from bdlab.claims import keep_alive
from bdlab.spec.model import TrialResources
from bdlab.tracking import Tracker, schema
from bdlab.tracking.mlflow_tracker import QUIET_MLFLOW_ENV
from bdlab.tracking.schema import finite_numbers, flat_trial_metrics
from bdlab.trial_config import AttackTrialConfig, DefenseTrialConfig, from_tune

# per worker process (actors are reused between trials): attacked models already loaded
_LOADED: dict[tuple[str, str], Any] = {}


def import_plugins(modules: list[str]) -> None:
    """Modules that register extra components (a researcher's own defenses), in every process."""
    for name in modules:
        importlib.import_module(name)


def claim_resources(resources: TrialResources) -> None:
    """Hold the trial to what it asked Ray for: torch threads = its CPUs; on a GPU shared by
    fractional trials, its share of the memory (Ray's fractions are logical only, and PyTorch's
    caching allocator never hands memory back to the other processes)."""
    import torch

    torch.set_num_threads(max(1, int(resources.cpu)))
    share = resources.gpu
    if torch.cuda.is_available() and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(max(0.05, 0.95 * share))


class _TrialConfig(Protocol):
    plugins: list[str]
    resources: TrialResources


T = TypeVar("T", bound=_TrialConfig)


def start_trial(cls: type[T], plain: dict[str, Any]) -> T:
    """The trial's typed config, with its plugins imported and its resources claimed."""
    config = from_tune(cls, plain)
    import_plugins(config.plugins)
    claim_resources(config.resources)
    return config


def placement_tags(device: str) -> dict[str, str]:
    """Where this process runs: host, Ray node, device, GPU and the torch/CUDA build."""
    import socket

    import ray
    import torch

    from trials.device import pick_device

    resolved = pick_device(device)
    tags = {
        schema.HOST: socket.gethostname(),
        schema.RAY_NODE: ray.get_runtime_context().get_node_id() if ray.is_initialized() else "none",
        schema.DEVICE: str(resolved),
        schema.GPU: "none",
        schema.GPU_MEMORY: "0",
        schema.TORCH: torch.__version__,
        schema.CUDA: torch.version.cuda or "none",
    }
    if resolved.type == "cuda":
        props = torch.cuda.get_device_properties(resolved)
        tags[schema.GPU] = props.name
        tags[schema.GPU_MEMORY] = f"{props.total_memory / 2**30:.1f}"
    return tags


def failure_reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
    return text[:480]


class StepLogger:
    """The progress callback of a trial: every record's numbers to the tracker at the next step;
    with `report_to_tune`, records that carry validation scores also to Tune (the scheduler's view)."""

    def __init__(self, tracker: Tracker, run_id: str, report_to_tune: bool = False) -> None:
        self.tracker, self.run_id, self.report_to_tune = tracker, run_id, report_to_tune
        self.steps = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self.steps += 1
        numbers = finite_numbers({k: v for k, v in record.items() if k != "phase"})
        self.tracker.log_metrics(self.run_id, numbers, step=self.steps)
        if self.report_to_tune and "val_acc" in numbers:
            tune.report(
                {"step": self.steps, "val_acc": numbers["val_acc"], "val_asr": numbers.get("val_asr")}
            )


# --- phase 1: one attacked model --------------------------------------------------------------------


def attack_trial(plain: dict[str, Any]) -> None:
    from trials.run import run_attack, save_attack_result

    config = start_trial(AttackTrialConfig, plain)
    tracker = config.store.tracker()
    cell = config.cell
    tags = {
        schema.PHASE: "attack",
        schema.SWEEP: config.sweep,
        schema.DATASET: cell.dataset,
        schema.MODEL: cell.model,
        schema.ATTACK: cell.attack,
        schema.CELL: cell.label,
    }
    run_id, mine = claim_attacked(tracker, config.key, cell.label, tags)
    if not mine:  # another trial or sweep trained it meanwhile
        tune.report({"trained": 0, "attack_run_id": run_id})
        return
    tracker.set_tags(run_id, placement_tags(config.device))
    progress = StepLogger(tracker, run_id)
    try:
        with keep_alive(tracker, run_id):  # waiting claimants see the training is alive
            result = run_attack(cell.attack_spec(config.device), progress=progress)
            with tempfile.TemporaryDirectory() as tmp:
                log_attacked(tracker, run_id, save_attack_result(result, Path(tmp) / "attacked"))
        tracker.finish_run(
            run_id,
            "FINISHED",
            metrics=flat_trial_metrics(result.metrics),
            tags={schema.NUM_CLASSES: str(result.data.num_classes)},
        )
    except BaseException as err:
        tracker.finish_run(run_id, "FAILED", tags={schema.FAILURE: failure_reason(err)})
        raise
    tune.report({"trained": 1, "attack_run_id": run_id, "acc": result.metrics["acc"]})


# --- phase 2: one defense trial ------------------------------------------------------------------


def _attacked(tracker: Tracker, config: DefenseTrialConfig) -> Any:
    from trials.run import load_attacked

    cache_key = (config.attacked_run_id, config.device)
    if cache_key not in _LOADED:
        folder = fetch_attacked(tracker, config.attacked_run_id, Path(config.attacked_cache))
        _LOADED.clear()  # one attacked model (and its dataset) per process at a time
        _LOADED[cache_key] = load_attacked(folder, config.device)
    return _LOADED[cache_key]


def open_trial_run(tracker: Tracker, config: DefenseTrialConfig) -> str:
    """The trial's MLflow child run, opened by the driver as it hands the trial out (so a retry in
    another actor logs into the same run): the run an earlier driver opened for this trial number
    when the trial is resumed, else a new one."""
    if config.resumed:
        existing = tracker.find_runs(
            [config.experiment_id],
            {schema.STUDY: config.study, schema.TRIAL: str(config.number)},
            statuses=("RUNNING", "FAILED", "KILLED", "FINISHED"),
        )
        if existing:
            return existing[0].run_id
    return tracker.create_run(
        config.experiment_id,
        f"{config.defense}#{config.number} {config.cell_label}",
        tags=config.tags,
        params={"defense": config.defense, **config.params},
        parent_run_id=config.parent_run_id,
    )


def defense_trial(plain: dict[str, Any]) -> None:
    import torch

    from trials.run import DefenseSpec, run_defense, save_defense_result

    config = start_trial(DefenseTrialConfig, plain)
    tracker = config.store.tracker()
    run_id = config.mlflow_run_id
    assert run_id is not None, "the driver opens the trial's run before handing it out"
    run = tracker.get_run(run_id)
    finished = run.status == "FINISHED" and f"val_{config.objectives[0]}" in run.metrics
    if config.resumed and finished:
        # the driver died between this trial's end and its record in the study
        tune.report({**run.metrics, "done": 1, "mlflow_run_id": run_id})
        return
    tracker.set_status(run_id, "RUNNING")  # a resumed or retried trial's run was ended
    attempt = int(run.tags.get(schema.ATTEMPT, "0")) + 1
    tracker.set_tags(run_id, {**placement_tags(config.device), schema.ATTEMPT: str(attempt)})
    # A retry logs into the run its failed attempt ended: the failure stays visible, but under
    # another tag, so `bdlab.failure` is only ever on runs that failed for good.
    done_tags = {schema.STATUS: "complete"}
    if earlier_failure := run.tags.get(schema.FAILURE):
        tracker.delete_tag(run_id, schema.FAILURE)
        done_tags[schema.EARLIER_FAILURE] = earlier_failure
    progress = StepLogger(tracker, run_id, report_to_tune=True)

    try:
        attacked = _attacked(tracker, config)
        spec = DefenseSpec(
            defense=config.defense,
            params=dict(config.params),
            preset=None,  # the params already hold the preset's values
            seed=config.seed,
            data_seed=config.data_seed,
            device=config.device,
            checkpoint_every_s=config.checkpoint_every_s,
        )
        checkpoints = CheckpointPlace(config.checkpoint_dir)
        result = run_defense(
            spec,
            attacked,
            progress=progress,
            checkpoint_dir=checkpoints.pull(),
            checkpoint_saved=checkpoints.push,
        )
        metrics = flat_trial_metrics(result.metrics)
        objectives = {f"val_{m}": result.metrics["val"].get(m) for m in config.objectives}
        bad = {k: v for k, v in objectives.items() if v is None or not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"objective {', '.join(bad)} is not a finite number: {bad}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_defense_result(result, Path(tmp) / "defended")
            trigger = attacked.folder / "trigger.png"
            if trigger.exists():
                shutil.copy(trigger, folder / "trigger.png")
            tracker.log_folder(run_id, folder, "defended")
        tracker.finish_run(run_id, "FINISHED", tags=done_tags, metrics=metrics)
        checkpoints.remove()
    except BaseException as err:
        tracker.finish_run(
            run_id, "FAILED", tags={schema.STATUS: "failed", schema.FAILURE: failure_reason(err)}
        )
        raise
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tune.report({**metrics, "done": 1, "mlflow_run_id": run_id, "step": progress.steps + 1})


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: one torch thread unless a trial asks for more, and MLflow quiet."""
    env = {"OMP_NUM_THREADS": "1", **QUIET_MLFLOW_ENV}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env
