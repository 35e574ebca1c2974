"""`bdlab sweep`: the two phases of a sweep on one Ray cluster, recorded in MLflow and Optuna.

    spec --load/validate--> SweepSpec
    phase 1: every attacked model the sweep needs that the store lacks -> Ray Tune trials (attack_trial);
             keys are content addresses (bdlab.cache), a claim makes racing sweeps train a key once
    phase 2: every (attacked model, defense) cell -> one Optuna study; all cells' trials are Ray Tune
             trials of one Tuner (bdlab.studies.CellSearcher), each an MLflow child run of the sweep
    report:  summary table and Pareto plots on the parent run, Parquet table under the results folder

Re-running the same command resumes (cached attacks, kept trials, restarted interrupted ones);
`fresh=True` starts a new generation of studies and child runs on the same attacked models.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdlab.cache import cache_key, find_attacked
from bdlab.claims import driver_lease
from bdlab.spec import DefenseCell, SweepSpec, load_sweep
from bdlab.tracking import GENERATION_TAG, Store, parent_run, sweep_experiment_name

Out = Callable[[str], None]


@dataclass
class SweepRun:
    """What the phases share: the spec, the store and the sweep's parent run."""

    spec: SweepSpec
    store: Store
    experiment_id: str
    parent_run_id: str
    generation: int
    attacked: dict[str, str] = field(default_factory=dict)  # cache key -> MLflow run id
    keys: list[str] = field(default_factory=list)  # per attack cell


def store_config(store: Store) -> dict[str, Any]:
    return {
        f.name: (str(v) if isinstance(v, Path) else v)
        for f, v in ((f, getattr(store, f.name)) for f in dataclasses.fields(store))
    }


def resources(spec: SweepSpec, phase: str) -> dict[str, float]:
    r = spec.resources.get(phase, {})
    return {"cpu": float(r.get("cpu", 1)), "gpu": float(r.get("gpu", 0))}


def concurrency(res: dict[str, float]) -> int:
    """How many trials of this size the cluster holds at once (the searcher asks no further ahead)."""
    import ray

    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 1) / max(res["cpu"], 1e-9))
    if res["gpu"] > 0:
        slots = min(slots, math.floor(total.get("GPU", 0) / res["gpu"]))
    return max(1, slots)


def start_ray(address: str | None, store: Store) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local one; workers get the tracking URI."""
    import ray

    from bdlab.trial import worker_env

    if ray.is_initialized():
        return
    env = {**worker_env(), **store.env()}
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
        configure_logging=True,
        logging_level="ERROR",
    )


def run_sweep(
    spec: SweepSpec | str | Path,
    results: str | Path = "results",
    tracking_uri: str | None = None,
    optuna_url: str | None = None,
    address: str | None = None,
    fresh: bool = False,
    out: Out = print,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary (also logged to the parent run and printed)."""
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    started = time.monotonic()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
    )  # our progress lines replace Tune's tables
    store = Store.open(results, tracking_uri, optuna_url)
    with driver_lease(store, spec.name):  # one driver per sweep: two would run its trials twice
        return _run(spec, store, fresh, address, out, started)


def _run(
    spec: SweepSpec, store: Store, fresh: bool, address: str | None, out: Out, started: float
) -> dict[str, Any]:
    from bdlab import report

    exp = store.experiment_id(sweep_experiment_name(spec.name))
    parent = parent_run(store, exp, spec.name, fresh=fresh, tags={"bdlab.spec": spec.source})
    generation = int(store.client().get_run(parent).data.tags[GENERATION_TAG])
    if spec.source and Path(spec.source).is_file():
        store.client().log_artifact(parent, spec.source)
    run = SweepRun(spec, store, exp, parent, generation)
    out(
        f"sweep {spec.name} (generation {generation}): {len(spec.attack_cells)} attacked models, "
        f"{len(spec.defense_cells())} defense cells, {sum(d.trials for d in spec.defenses) * len(spec.attack_cells)} "
        f"defense trials; tracking {store.tracking_uri}"
    )
    phase_started = time.monotonic()
    attack_phase(run, address, out)
    attack_s = time.monotonic() - phase_started
    phase_started = time.monotonic()
    defense_phase(run, address, out)
    defense_s = time.monotonic() - phase_started
    summary = report.summarize(run)
    report.publish(run, summary, out)
    summary["seconds"] = {"attack_phase": round(attack_s, 2), "defense_phase": round(defense_s, 2)}
    out(
        f"done in {time.monotonic() - started:.0f} s (attack phase {attack_s:.1f} s, "
        f"defense phase {defense_s:.1f} s)"
    )
    return summary


# --- phase 1 ---------------------------------------------------------------------------------------


def attack_phase(run: SweepRun, address: str | None, out: Out) -> None:
    spec, store = run.spec, run.store
    todo = []
    for cell in spec.attack_cells:
        key = cache_key(cell.identity())
        run.keys.append(key)
        hit = find_attacked(store, key)
        if hit is not None:
            run.attacked[key] = hit
        elif all(key != k for k, _ in todo):
            todo.append((key, cell))
    out(f"[attack] {len(spec.attack_cells) - len(todo)} of {len(spec.attack_cells)} attacked models cached")
    if not todo:
        return
    from ray import tune

    from bdlab.progress import PhaseProgress
    from bdlab.trial import attack_trial

    start_ray(address, store)
    res = resources(spec, "attack")
    configs = [
        {
            "cell": dataclasses.asdict(cell),
            "key": key,
            "store": store_config(store),
            "sweep": spec.name,
            "device": spec.device,
            "cpu": res["cpu"],
            "gpu": res["gpu"],
            "plugins": list(spec.plugins),
        }
        for key, cell in todo
    ]
    labels = [f"{cell.label} ({_short(key)})" for key, cell in todo]
    progress = PhaseProgress("attack", len(configs), lambda t: labels[t.config["index"]], out=out)
    # the grid index selects the config: Tune's grid would otherwise expand nested dicts into params
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_indexed(attack_trial), configs=configs), res),
        param_space={"index": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False),
        run_config=_run_config(run, "attack", progress),
    )
    tuner.fit()
    for key, _ in todo:
        hit = find_attacked(store, key)
        if hit is None:
            raise RuntimeError(f"attacked model {key} was not trained (see the failed attack run in MLflow)")
        run.attacked[key] = hit


def _indexed(fn: Callable[[dict], None]) -> Callable[..., None]:
    def trainable(config: dict, configs: list[dict]) -> None:
        fn(configs[config["index"]])

    trainable.__name__ = fn.__name__
    return trainable


def _short(key: str) -> str:
    return key[:8]


def _run_config(run: SweepRun, phase: str, progress: Any):
    from ray import tune

    return tune.RunConfig(
        name=f"{run.spec.name}-g{run.generation}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str((run.store.results / "ray").resolve()),
        failure_config=tune.FailureConfig(max_failures=int(run.spec.failure.get("max_retries", 1))),
        callbacks=[progress],
        verbose=0,
        log_to_file=True,
    )


# --- phase 2 ---------------------------------------------------------------------------------------


def defense_phase(run: SweepRun, address: str | None, out: Out) -> None:
    from bdlab.studies import CellSearcher, open_study, study_name
    from bdlab.trial import open_trial_run

    spec, store = run.spec, run.store
    cells = spec.defense_cells()
    names = [study_name(spec.name, run.generation, c) for c in cells]
    studies = [open_study(spec, store.optuna_url, n) for n in names]
    key_of = {id(c): run.keys[spec.attack_cells.index(c.attack)] for c in cells}
    res = resources(spec, "defense")

    def trial_config(i: int, pending) -> dict[str, Any]:
        config = describe_trial(i, pending)
        config["mlflow_run_id"] = open_trial_run(store, config)
        return config

    def describe_trial(i: int, pending) -> dict[str, Any]:
        cell: DefenseCell = cells[i]
        key = key_of[id(cell)]
        checkpoints = (
            store.results / "checkpoints" / names[i].replace(":", "_").replace("/", "_") / str(pending.number)
        )
        return {
            "study": names[i],
            "number": pending.number,
            "default": pending.default,
            "resumed": pending.resumed,
            "defense": cell.defense.name,
            "params": pending.params,
            "cell_label": cell.label,
            "attacked_run_id": run.attacked[key],
            "attacked_cache": str(store.results / "attacked"),
            "checkpoint_dir": str(checkpoints),
            "store": store_config(store),
            "experiment_id": run.experiment_id,
            "parent_run_id": run.parent_run_id,
            "objectives": list(spec.objectives),
            "seed": cell.attack.seed,
            "device": spec.device,
            "cpu": res["cpu"],
            "gpu": res["gpu"],
            "plugins": list(spec.plugins),
            "tags": {
                "bdlab.sweep": spec.name,
                "bdlab.phase": "defense",
                "bdlab.generation": str(run.generation),
                "bdlab.dataset": cell.attack.dataset,
                "bdlab.model": cell.attack.model,
                "bdlab.attack": cell.attack.attack,
                "bdlab.defense": cell.defense.name,
                "bdlab.cell": cell.label,
                "bdlab.cache_key": key,
                "bdlab.study": names[i],
                "bdlab.trial": str(pending.number),
                "bdlab.default": str(pending.default).lower(),
                "bdlab.status": "running",
            },
        }

    best: dict[int, tuple[float, str]] = {}

    def best_line(trial, result: dict) -> str | None:
        if not result.get("done"):
            return None
        i = next(k for k, n in enumerate(names) if n == trial.config["study"])
        score = result.get("val_acc", 0.0) - result.get("val_asr", 0.0)
        line = f"{cells[i].label}: val ACC {result.get('val_acc', 0):.3f} ASR {result.get('val_asr', 0):.3f} (trial {trial.config['number']})"
        if i not in best or score > best[i][0]:
            best[i] = (score, line)
            return line
        return None

    searcher = CellSearcher(spec, cells, studies, trial_config)
    total = searcher.remaining()
    kept = sum(s.asked - len(s.resume) for s in searcher.states)
    out(f"[defense] {len(cells)} cells, {kept} trials kept from earlier runs, {total} to run")
    if total == 0:
        return
    from ray import tune

    from bdlab.progress import PhaseProgress
    from bdlab.trial import defense_trial

    start_ray(address, store)
    progress = PhaseProgress(
        "defense",
        total,
        lambda t: f"{t.config['defense']}#{t.config['number']} on {t.config['cell_label'].split(' :: ')[0]}",
        best_line,
        out=out,
    )
    tuner = tune.Tuner(
        tune.with_resources(defense_trial, res),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=concurrency(res),
            reuse_actors=True,
        ),
        run_config=_run_config(run, "defense", progress),
    )
    tuner.fit()
