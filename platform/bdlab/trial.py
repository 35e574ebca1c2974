"""What a Ray Tune trial runs on a worker: one attack cell (phase 1) or one defense trial (phase 2).

A trial gets everything it needs in its config (plain JSON-able values): the store's URIs, the
cell, the parameters, the MLflow parent run. It logs to MLflow through the tracking URI only, so a
worker on another node needs no shared filesystem (checkpoints of long defenses are the exception:
they go under the results folder when the worker can see it).

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
from typing import Any

from ray import tune

from bdlab.cache import claim_attacked, fetch_attacked, log_attacked
from bdlab.claims import keep_alive
from bdlab.tracking import Store, find_runs, finish_run, log_folder, log_metrics, start_child_run

# per worker process (actors are reused between trials): attacked models already loaded
_LOADED: dict[tuple[str, str], Any] = {}


def import_plugins(modules: list[str]) -> None:
    """Modules that register extra components (a researcher's own defenses), in every process."""
    for name in modules:
        importlib.import_module(name)


def claim_resources(config: dict[str, Any]) -> None:
    """Hold the trial to what it asked Ray for: torch threads = its CPUs; on a GPU shared by
    fractional trials, its share of the memory (Ray's fractions are logical only, and PyTorch's
    caching allocator never hands memory back to the other processes)."""
    import torch

    torch.set_num_threads(max(1, int(config["cpu"])))
    share = config.get("gpu", 0)
    if torch.cuda.is_available() and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(max(0.05, 0.95 * share))


def failure_reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
    return text[:480]


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers only; the report half at top level, the validation half as `val_*`."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


def trial_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = flat_metrics({k: v for k, v in metrics.items() if k not in ("val", "before", "findings")})
    out.update(flat_metrics(metrics.get("val", {}), "val_"))
    if "before" in metrics:
        out.update(flat_metrics({k: v for k, v in metrics["before"].items() if k != "val"}, "before_"))
    return out


class StepLogger:
    """The progress callback of a trial: every record's numbers to MLflow at the next step; with
    `report_to_tune`, records that carry validation scores also to Tune (the scheduler's view)."""

    def __init__(self, store: Store, run_id: str, report_to_tune: bool = False) -> None:
        self.store, self.run_id, self.report_to_tune = store, run_id, report_to_tune
        self.steps = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self.steps += 1
        numbers = flat_metrics({k: v for k, v in record.items() if k != "phase"})
        log_metrics(self.store, self.run_id, numbers, step=self.steps)
        if self.report_to_tune and "val_acc" in numbers:
            tune.report(
                {"step": self.steps, "val_acc": numbers["val_acc"], "val_asr": numbers.get("val_asr")}
            )


# --- phase 1: one attacked model --------------------------------------------------------------------


def attack_trial(config: dict[str, Any]) -> None:
    from bdlab.spec import AttackCell
    from trials.run import run_attack, save_attack_result

    import_plugins(config.get("plugins", []))
    claim_resources(config)
    store = Store(**config["store"])
    cell = AttackCell(**config["cell"])
    key = config["key"]
    tags = {
        "bdlab.phase": "attack",
        "bdlab.sweep": config["sweep"],
        "bdlab.dataset": cell.dataset,
        "bdlab.model": cell.model,
        "bdlab.attack": cell.attack,
        "bdlab.cell": cell.label,
    }
    run_id, mine = claim_attacked(store, key, cell.label, tags)
    if not mine:  # another trial or sweep trained it meanwhile
        tune.report({"trained": 0, "attack_run_id": run_id})
        return
    progress = StepLogger(store, run_id)
    try:
        with keep_alive(store, run_id):  # waiting claimants see the training is alive
            result = run_attack(cell.attack_spec(config["device"]), progress=progress)
            with tempfile.TemporaryDirectory() as tmp:
                log_attacked(store, run_id, save_attack_result(result, Path(tmp) / "attacked"))
        finish_run(store, run_id, "FINISHED", metrics=trial_metrics(result.metrics))
    except BaseException as err:
        finish_run(store, run_id, "FAILED", tags={"bdlab.failure": failure_reason(err)})
        raise
    tune.report({"trained": 1, "attack_run_id": run_id, "acc": result.metrics["acc"]})


# --- phase 2: one defense trial ------------------------------------------------------------------


def _attacked(store: Store, config: dict[str, Any]):
    from trials.run import load_attacked

    cache_key = (config["attacked_run_id"], config["device"])
    if cache_key not in _LOADED:
        root = Path(config.get("attacked_cache") or Path.home() / ".cache" / "bdlab" / "attacked")
        folder = fetch_attacked(store, config["attacked_run_id"], root)
        _LOADED.clear()  # one attacked model (and its dataset) per process at a time
        _LOADED[cache_key] = load_attacked(folder, config["device"])
    return _LOADED[cache_key]


def open_trial_run(store: Store, config: dict[str, Any]) -> str:
    """The trial's MLflow child run, opened by the driver as it hands the trial out (so a retry in
    another actor logs into the same run): the run an earlier driver opened for this trial number
    when the trial is resumed, else a new one."""
    if config["resumed"]:
        existing = find_runs(
            store,
            [config["experiment_id"]],
            {"bdlab.study": config["study"], "bdlab.trial": str(config["number"])},
            statuses=("RUNNING", "FAILED", "KILLED", "FINISHED"),
        )
        if existing:
            return existing[0].info.run_id
    return start_child_run(
        store,
        config["experiment_id"],
        config["parent_run_id"],
        name=f"{config['defense']}#{config['number']} {config['cell_label']}",
        tags=config["tags"],
        params={"defense": config["defense"], **config["params"]},
    )


def defense_trial(config: dict[str, Any]) -> None:
    import torch

    from trials.run import DefenseSpec, run_defense, save_defense_result

    import_plugins(config.get("plugins", []))
    claim_resources(config)
    store = Store(**config["store"])
    run_id = config["mlflow_run_id"]
    client = store.client()
    run = client.get_run(run_id)
    finished = run.info.status == "FINISHED" and f"val_{config['objectives'][0]}" in run.data.metrics
    if config["resumed"] and finished:
        # the driver died between this trial's end and its record in the study
        tune.report({**run.data.metrics, "done": 1, "mlflow_run_id": run_id})
        return
    client.update_run(run_id, status="RUNNING")  # a resumed or retried trial's run was ended
    # A retry logs into the run its failed attempt ended: the failure stays visible, but under
    # another tag, so `bdlab.failure` is only ever on runs that failed for good.
    done_tags = {"bdlab.status": "complete"}
    if earlier_failure := run.data.tags.get("bdlab.failure"):
        client.delete_tag(run_id, "bdlab.failure")
        done_tags["bdlab.earlier_failure"] = earlier_failure
    progress = StepLogger(store, run_id, report_to_tune=True)

    try:
        attacked = _attacked(store, config)
        spec = DefenseSpec(
            defense=config["defense"],
            params=dict(config["params"]),
            preset=None,  # the params already hold the preset's values
            seed=config["seed"],
            device=config["device"],
            checkpoint_every_s=config.get("checkpoint_every_s", 600.0),
        )
        checkpoint = Path(config["checkpoint_dir"]) if config.get("checkpoint_dir") else None
        result = run_defense(spec, attacked, progress=progress, checkpoint_dir=checkpoint)
        metrics = trial_metrics(result.metrics)
        objectives = {f"val_{m}": result.metrics["val"].get(m) for m in config["objectives"]}
        bad = {k: v for k, v in objectives.items() if v is None or not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"objective {', '.join(bad)} is not a finite number: {bad}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_defense_result(result, Path(tmp) / "defended")
            trigger = attacked.folder / "trigger.png"
            if trigger.exists():
                shutil.copy(trigger, folder / "trigger.png")
            log_folder(store, run_id, folder, "defended")
        finish_run(store, run_id, "FINISHED", tags=done_tags, metrics=metrics)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)
    except BaseException as err:
        finish_run(
            store, run_id, "FAILED", tags={"bdlab.status": "failed", "bdlab.failure": failure_reason(err)}
        )
        raise
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tune.report({**metrics, "done": 1, "mlflow_run_id": run_id, "step": progress.steps + 1})


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: one torch thread unless a trial asks for more."""
    env = {
        "OMP_NUM_THREADS": "1",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env
