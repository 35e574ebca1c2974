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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdlab import report
from bdlab.cache import find_attacked
from bdlab.claims import driver_lease
from bdlab.spec import DefenseCell, SweepSpec, TrialResources, load_sweep
from bdlab.tracking import Store, Tracker, schema
from bdlab.trial_config import AttackTrialConfig, DefenseTrialConfig, as_tune
from trials.errors import BdlabError, InvalidValue

Out = Callable[[str], None]


@dataclass
class SweepRun:
    """What the phases share: the spec, the store and the sweep's parent run."""

    spec: SweepSpec
    store: Store
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    generation: int
    attacked: dict[str, str] = field(default_factory=dict)  # attack cell key -> MLflow run id
    # where defense trials checkpoint: a folder every node mounts, or an s3:// (any pyarrow) URI;
    # None: under the results folder
    checkpoints: str | None = None
    # the store as Ray workers reach it (a loopback server named by this node's address on a cluster)
    worker_store: Store | None = None
    cpus: float = 0.0  # the most CPUs its Ray cluster was seen with (bdlab.sweep._cluster_cpus)
    joined: bool = False  # the sweep joined a running cluster (which may autoscale) rather than start one


def parent_run(
    tracker: Tracker,
    experiment_id: str,
    sweep: str,
    *,
    fresh: bool = False,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """The id of the sweep's parent run: the newest generation is reused (a re-run resumes it);
    `fresh=True` starts generation N+1. Tag `bdlab.generation` names the generation."""
    existing = tracker.find_runs([experiment_id], {schema.KIND: "sweep", schema.SWEEP: sweep}, statuses=None)
    generations = [(_int(r.tags.get(schema.GENERATION)), r.run_id) for r in existing]
    newest = max(generations, default=(0, None))
    if newest[1] is not None and not fresh:
        if tags:
            tracker.set_tags(newest[1], tags)
        return newest[1]
    generation = newest[0] + 1
    return tracker.create_run(
        experiment_id,
        sweep if generation == 1 else f"{sweep} (generation {generation})",
        tags={**(tags or {}), schema.KIND: "sweep", schema.SWEEP: sweep, schema.GENERATION: str(generation)},
    )


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def concurrency(res: TrialResources) -> int:
    """How many trials of this size the cluster holds at once (the searcher asks no further ahead)."""
    import ray

    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 1) / max(res.cpu, 1e-9))
    if res.gpu > 0:
        slots = min(slots, math.floor(total.get("GPU", 0) / res.gpu))
    return max(1, slots)


def check_fits(res: TrialResources, phase: str, joined: bool, out: Out) -> None:
    """A trial must fit on one node. On the local Ray this sweep started, one that fits nowhere is
    an error (it would wait forever); on a joined cluster the autoscaler may still add such a node,
    so the sweep says what it waits for instead of waiting silently (Tune's warning is muted)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= res.cpu and n.get("GPU", 0) >= res.gpu for n in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    have = f"{largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs"
    asked = f"cpu {res.cpu:g}, gpu {res.gpu:g}"
    if not joined:
        raise InvalidValue(
            f"resources.{phase}", asked, f"at most what one node of this Ray has ({have}): no trial could start"
        )
    out(
        f"[{phase}] waiting for a node with {asked}: none of the {len(nodes)} nodes has it now (largest: "
        f"{have}); the autoscaler adds one if the cluster has such a node type, else stop and lower "
        f"resources.{phase}"
    )


def start_ray(address: str | None, run: SweepRun) -> Store:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local one; returns the store as the
    workers reach it (also `run.worker_store`), whose URI and login they get in their environment.

    On a cluster, workers log over HTTP only: a local store (a database file) is refused, and a
    server the driver reaches on loopback (`bdlab server start` on the head) is named by this node's
    address, which the other nodes reach (the server must listen there: `--host 0.0.0.0`)."""
    import ray

    from bdlab.worker import worker_env

    if run.worker_store is not None:
        return run.worker_store
    address = address or os.environ.get("RAY_ADDRESS")
    run.joined = bool(address)
    store = run.store
    if address and store.is_loopback:
        outside = store.at_host(ray.util.get_node_ip_address())
        if _answers(outside.tracking_uri):
            store = outside
    if not ray.is_initialized():
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {**worker_env(), **store.env()}},
            configure_logging=True,
            logging_level="ERROR",
        )
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        if not store.is_remote:
            raise BdlabError(
                f"tracking_uri: {store.tracking_uri!r} is a database file the other nodes of this Ray "
                "cluster cannot reach; track to a server (bdlab server start, then --tracking-uri http://HEAD:PORT)"
            )
        if store.is_loopback:
            raise BdlabError(
                f"tracking_uri: {store.tracking_uri} answers on loopback only, which the other nodes of "
                "this Ray cluster cannot reach; start the server with --host 0.0.0.0 (or the private address)"
            )
    run.worker_store = store
    _cluster_cpus(run)
    return store


def _answers(uri: str) -> bool:
    """Whether the MLflow server answers API requests at `uri` (a login it asks for counts as an
    answer); a server that refuses the address itself (its DNS-rebinding guard) is one line."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5):
            return True
    except urllib.error.HTTPError as err:
        if err.code == 403 and b"Invalid Host" in err.read():
            raise BdlabError(
                f"tracking_uri: the server refuses requests addressed to {uri}, the address the other "
                "nodes use; allow it (MLFLOW_SERVER_ALLOWED_HOSTS of the server; `bdlab server start` "
                "allows its own addresses)"
            ) from None
        return err.code == 401
    except OSError:
        return False


def run_sweep(
    spec: SweepSpec | str | Path,
    results: str | Path = "results",
    tracking_uri: str | None = None,
    optuna_url: str | None = None,
    address: str | None = None,
    fresh: bool = False,
    out: Out = print,
    checkpoints: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary (also logged to the parent run and printed).
    `checkpoints`: where long defense trials checkpoint (default: the results folder; on a cluster,
    a folder every node mounts or an s3:// URI, so a trial moved to another node resumes)."""
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    started = time.monotonic()
    store = Store.open(results, tracking_uri, optuna_url)
    tracker = store.tracker()
    with driver_lease(tracker, spec.name):  # one driver per sweep: two would run its trials twice
        return _run(spec, store, tracker, fresh, address, out, started, checkpoints)


def _run(
    spec: SweepSpec,
    store: Store,
    tracker: Tracker,
    fresh: bool,
    address: str | None,
    out: Out,
    started: float,
    checkpoints: str | None = None,
) -> dict[str, Any]:
    exp = tracker.experiment_id(schema.sweep_experiment(spec.name), schema.experiment_tags(spec.objectives))
    parent = parent_run(tracker, exp, spec.name, fresh=fresh, tags={schema.SPEC: spec.source})
    generation = int(tracker.get_run(parent).tags[schema.GENERATION])
    if spec.source and Path(spec.source).is_file():
        tracker.log_artifact(parent, spec.source)
    run = SweepRun(spec, store, tracker, exp, parent, generation, checkpoints=checkpoints)
    out(
        f"sweep {spec.name} (generation {generation}): {len(spec.attack_cells)} attacked models, "
        f"{len(spec.defense_cells())} defense cells, {spec.trial_count} defense trials; "
        f"tracking {store.tracking_uri}"
    )
    phase_started = time.monotonic()
    attack_busy = attack_phase(run, address, out)
    attack_s = time.monotonic() - phase_started
    phase_started = time.monotonic()
    defense_busy = defense_phase(run, address, out)
    defense_s = time.monotonic() - phase_started
    from bdlab.studies import study_name

    cells = [
        report.CellRef(c.label, study_name(spec.name, generation, c), run.attacked[c.attack.key])
        for c in spec.defense_cells()
    ]
    sweep = report.SweepRef(spec.name, generation, exp, parent, dict(spec.objectives))
    summary = report.summarize(store, sweep, cells)
    report.publish(store, sweep, summary, out)
    wall = time.monotonic() - started
    summary["seconds"] = {"attack_phase": round(attack_s, 2), "defense_phase": round(defense_s, 2)}
    busy = ""
    cpus = _cluster_cpus(run)
    if cpus:
        # the whole sweep's, start-up, the cache lookups and the summary included
        summary["busy_fraction"] = round((attack_busy + defense_busy) / (wall * cpus), 4)
        busy = f"; busy fraction {summary['busy_fraction']:.2f} (trial CPU-seconds over {wall:.0f} s x {cpus:g} CPUs)"
    out(f"done in {wall:.0f} s (attack phase {attack_s:.1f} s, defense phase {defense_s:.1f} s){busy}")
    return summary


def _cluster_cpus(run: SweepRun) -> float:
    """The most CPUs the sweep's Ray cluster was seen with, at each phase's start and end (a node
    lost mid-phase must not inflate the busy fraction); 0 when no phase started one (all cached)."""
    import ray

    if ray.is_initialized():
        run.cpus = max(run.cpus, float(ray.cluster_resources().get("CPU", 0)))
    return run.cpus


def report_busy(progress: Any, phase: str, cpus_per_trial: float, run: SweepRun, out: Out) -> float:
    """Print the phase's busy fraction; return the CPU-seconds its trials held."""
    cpus = _cluster_cpus(run)
    fraction = progress.busy_fraction(cpus_per_trial, cpus)
    out(
        f"[{phase}] busy fraction {fraction:.2f}: trials held {progress.trial_seconds * cpus_per_trial:.0f} "
        f"CPU-seconds of {progress.clock() - progress.started:.0f} s x {cpus:g} CPUs"
    )
    return progress.trial_seconds * cpus_per_trial


# --- phase 1 ---------------------------------------------------------------------------------------


def attack_phase(run: SweepRun, address: str | None, out: Out) -> float:
    """Train the attacked models the store lacks; return the CPU-seconds the trials held."""
    spec, tracker = run.spec, run.tracker
    todo = []
    for cell in spec.attack_cells:
        hit = find_attacked(tracker, cell.key)
        if hit is not None:
            run.attacked[cell.key] = hit
        elif all(cell.key != c.key for c in todo):
            todo.append(cell)
    out(f"[attack] {len(spec.attack_cells) - len(todo)} of {len(spec.attack_cells)} attacked models cached")
    if not todo:
        return 0.0
    from ray import tune

    from bdlab.progress import PhaseProgress
    from bdlab.worker import attack_trial

    workers = start_ray(address, run)
    res = spec.resources.attack
    check_fits(res, "attack", run.joined, out)
    configs = [
        as_tune(AttackTrialConfig(cell, cell.key, workers, spec.name, spec.device, res, list(spec.plugins)))
        for cell in todo
    ]
    labels = [f"{cell.label} ({cell.key[:8]})" for cell in todo]
    progress = PhaseProgress("attack", len(configs), lambda t: labels[t.config["index"]], out=out)
    # the grid index selects the config: Tune's grid would otherwise expand nested dicts into params
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_indexed(attack_trial), configs=configs), res.as_ray()),
        param_space={"index": tune.grid_search(list(range(len(configs))))},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False),
        run_config=_run_config(run, "attack", progress),
    )
    tuner.fit()
    held = report_busy(progress, "attack", res.cpu, run, out)
    for cell in todo:
        hit = find_attacked(tracker, cell.key)
        if hit is None:
            raise RuntimeError(
                f"attacked model {cell.key} was not trained (see the failed attack run in MLflow)"
            )
        run.attacked[cell.key] = hit
    return held


def _indexed(fn: Callable[[dict], None]) -> Callable[..., None]:
    def trainable(config: dict, configs: list[dict]) -> None:
        fn(configs[config["index"]])

    trainable.__name__ = fn.__name__
    return trainable


def _run_config(run: SweepRun, phase: str, progress: Any) -> Any:
    from ray import tune

    return tune.RunConfig(
        name=f"{run.spec.name}-g{run.generation}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=str((run.store.results / "ray").resolve()),
        failure_config=tune.FailureConfig(max_failures=run.spec.failure.max_retries),
        callbacks=[progress],
        verbose=0,
        log_to_file=True,
    )


# --- phase 2 ---------------------------------------------------------------------------------------


def defense_phase(run: SweepRun, address: str | None, out: Out) -> float:
    """Run every defense cell's trials; return the CPU-seconds they held."""
    from bdlab.designs import subset_seed
    from bdlab.studies import CellSearcher, open_study, study_name
    from bdlab.worker import open_trial_run

    spec, store, tracker = run.spec, run.store, run.tracker
    cells = spec.defense_cells()
    names = [study_name(spec.name, run.generation, c) for c in cells]
    studies = [open_study(spec, store.optuna_url, n) for n in names]
    res = spec.resources.defense

    def trial_config(i: int, pending: Any) -> dict[str, Any]:
        config = describe_trial(i, pending)
        return as_tune(dataclasses.replace(config, mlflow_run_id=open_trial_run(tracker, config)))

    def describe_trial(i: int, pending: Any) -> DefenseTrialConfig:
        cell: DefenseCell = cells[i]
        point = pending.point  # a study trial's design point (None: a search trial)
        design_tags: dict[str, str] = {}
        if point is not None:
            design_tags = {
                schema.DESIGN: str(point["design"]),
                schema.CONFIGURATION: str(point["configuration"]),
                schema.DEFENSE_SEED: str(point["defense_seed"]),
                schema.DATA_SUBSET: str(point["data_subset"]),
            }
            if point.get("data_fraction") is not None:
                design_tags[schema.DATA_FRACTION] = str(point["data_fraction"])
        folder = f"{names[i].replace(':', '_').replace('/', '_')}/{pending.number}"
        checkpoints = f"{(run.checkpoints or str(store.results / 'checkpoints')).rstrip('/')}/{folder}"
        return DefenseTrialConfig(
            study=names[i],
            number=pending.number,
            default=pending.default,
            resumed=pending.resumed,
            defense=cell.defense.name,
            params=pending.params,
            cell_label=cell.label,
            attacked_run_id=run.attacked[cell.attack.key],
            attacked_cache=str(store.results / "attacked"),
            checkpoint_dir=checkpoints,
            store=run.worker_store or store,
            experiment_id=run.experiment_id,
            parent_run_id=run.parent_run_id,
            objectives=list(spec.objectives),
            seed=cell.attack.seed if point is None else int(point["defense_seed"]),
            data_seed=None if point is None else subset_seed(cell.attack.seed, int(point["data_subset"])),
            device=spec.device,
            resources=res,
            plugins=list(spec.plugins),
            tags={
                schema.SWEEP: spec.name,
                schema.PHASE: "defense",
                schema.GENERATION: str(run.generation),
                schema.DATASET: cell.attack.dataset,
                schema.MODEL: cell.attack.model,
                schema.ATTACK: cell.attack.attack,
                schema.DEFENSE: cell.defense.name,
                schema.CELL: cell.label,
                schema.CACHE_KEY: cell.attack.key,
                schema.STUDY: names[i],
                schema.TRIAL: str(pending.number),
                schema.DEFAULT: str(pending.default).lower(),
                schema.STATUS: "running",
                **design_tags,
            },
        )

    front_lines = FrontTracker(spec.objectives, [c.label for c in cells])

    def best_line(trial: Any, result: dict) -> str | None:
        if not result.get("done"):
            return None
        return front_lines.offer(names.index(trial.config["study"]), trial.config["number"], result)

    searcher = CellSearcher(spec, cells, studies, trial_config)
    total = searcher.remaining()
    kept = sum(s.asked - len(s.resume) for s in searcher.states)
    out(f"[defense] {len(cells)} cells, {kept} trials kept from earlier runs, {total} to run")
    if total == 0:
        return 0.0
    from ray import tune

    from bdlab.progress import PhaseProgress
    from bdlab.worker import defense_trial

    start_ray(address, run)
    check_fits(res, "defense", run.joined, out)
    progress = PhaseProgress(
        "defense",
        total,
        lambda t: f"{t.config['defense']}#{t.config['number']} on {t.config['cell_label'].split(' :: ')[0]}",
        best_line,
        out=out,
    )
    tuner = tune.Tuner(
        tune.with_resources(defense_trial, res.as_ray()),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=concurrency(res),
            reuse_actors=True,
        ),
        run_config=_run_config(run, "defense", progress),
    )
    tuner.fit()
    return report_busy(progress, "defense", res.cpu, run, out)


class FrontTracker:
    """The "best so far" lines of a sweep: a finished trial is news when no earlier trial of its
    cell beats it on every validation objective of the spec (it joins the cell's running front)."""

    def __init__(self, objectives: dict[str, str], labels: list[str]) -> None:
        self.objectives, self.labels = dict(objectives), labels
        self.scores: dict[int, list[tuple[float, ...]]] = {}

    def offer(self, cell: int, number: int, result: dict) -> str | None:
        from bdlab.reporting import dominates

        values = [result.get(f"val_{m}") for m in self.objectives]
        if any(v is None for v in values):
            return None
        score = tuple(-v if d == "max" else v for v, d in zip(values, self.objectives.values(), strict=True))
        earlier = self.scores.setdefault(cell, [])
        news = not any(dominates(s, score) or s == score for s in earlier)
        earlier.append(score)
        if not news:
            return None
        shown = ", ".join(f"{m} {v:.3f}" for m, v in zip(self.objectives, values, strict=True))
        return f"{self.labels[cell]}: trial {number} joins the validation front ({shown})"
