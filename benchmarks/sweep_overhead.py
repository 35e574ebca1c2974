"""Platform overhead per trial: a sweep of N small trials against the same trial function called N
times in a loop, one process (one trial at a time) on each side.

    .venv/bin/python benchmarks/sweep_overhead.py            # sweeps of 15 and 30 CLP trials, tiny digits model
    .venv/bin/python benchmarks/sweep_overhead.py --trials 30
    .venv/bin/python benchmarks/sweep_overhead.py --store server   # through `bdlab server` (PostgreSQL)

Both sides run `trials.run.run_defense` with CLP (data-free, about a second) on the same attacked
model. The sweep side adds everything the platform does per trial: the searcher's Optuna ask/tell
(SQLite storage), scheduling the trial on a reused Ray actor, the MLflow child run (params, step and
final metrics, the defended model and spec as artifacts, local SQLite store), progress lines. With
`--store server` the same goes through the team service of a cluster (`bdlab server start`: MLflow
with logins on PostgreSQL, artifacts proxied over HTTP, Optuna on the same PostgreSQL). The
Ray cluster (1 CPU, so one trial at a time) is started before the clock starts: the target is the
overhead "once the cluster is up". The attacked model is cached by a warm-up sweep first, so the
timed sweep is phase 2 (plus the summary, Pareto plots and Parquet table at its end, which are
counted in: a per-sweep cost spread over N trials).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def spec(name: str, trials: int) -> dict:
    return {
        "name": name,
        "datasets": [{"name": "digits", "params": {"train_subset": 200, "test_subset": 100}}],
        "models": ["mini_resnet"],
        "attacks": [{"name": "badnets", "params": {"ratio": 0.2}}],
        "attack_training": {"epochs": 2},
        "defenses": [{"name": "clp", "trials": trials}],
        "resources": {"attack": {"cpu": 1}, "defense": {"cpu": 1}},
        "device": "cpu",
    }


@contextlib.contextmanager
def tracking(store: str, tmp: Path) -> Iterator[dict[str, str]]:
    """run_sweep's tracking arguments: none (the local SQLite store under the results folder), or a
    `bdlab server` started here (PostgreSQL and MLflow with logins; the sweep logs in as its admin)."""
    if store == "local":
        yield {}
        return
    from bdlab import service
    from bdlab.servers import free_port

    secrets = {
        "MLFLOW_AUTH_ADMIN_PASSWORD": "overhead-admin-password",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "overhead-flask-secret",
        "BDLAB_DB_PASSWORD": "overhead-db-password",
    }
    os.environ.update(secrets)
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    os.chmod(tmp, 0o711)  # PostgreSQL runs as `postgres` when we are root
    state = service.start(tmp / "service", port=free_port())
    try:
        yield {"tracking_uri": state.tracking_uri, "optuna_url": state.optuna_url(with_password=True)}
    finally:
        service.stop(tmp / "service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15, help="N: sweeps of N and 2N trials are timed")
    parser.add_argument(
        "--store", choices=["local", "server"], default="local", help="local SQLite, or `bdlab server` on PostgreSQL"
    )
    args = parser.parse_args(argv)

    import ray
    import torch
    from bdlab.cache import cache_key, fetch_attacked, find_attacked
    from bdlab.spec import parse_sweep
    from bdlab.sweep import run_sweep
    from bdlab.tracking import Store

    from trials.run import DefenseSpec, load_attacked, run_defense

    torch.set_num_threads(1)
    quiet = lambda line: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp, tracking(args.store, Path(tmp)) as uris:
        results = Path(tmp) / "results"
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        # trains and caches the model
        run_sweep(parse_sweep(spec("warmup", 1)), results=results, out=quiet, **uris)

        # two sweeps, N and 2N trials: the slope is the cost of one more trial, apart from the
        # once-per-phase costs (a Tune run, its first actor importing torch, loading the model)
        phases = {}
        for n in (args.trials, 2 * args.trials):
            summary = run_sweep(parse_sweep(spec(f"overhead{n}", n)), results=results, out=quiet, **uris)
            phases[n] = summary["seconds"]["defense_phase"]
        ray.shutdown()

        tracker = Store.open(results, uris.get("tracking_uri"), uris.get("optuna_url")).tracker()
        key = cache_key(parse_sweep(spec("x", 1)).attack_cells[0].identity())
        attacked = load_attacked(fetch_attacked(tracker, find_attacked(tracker, key), Path(tmp) / "a"), "cpu")
        started = time.perf_counter()
        for _ in range(args.trials):
            run_defense(DefenseSpec("clp", {}, device="cpu"), attacked)
        loop_per_trial = (time.perf_counter() - started) / args.trials

    n = args.trials
    sweep_per_trial = (phases[2 * n] - phases[n]) / n
    fixed = phases[n] - n * sweep_per_trial
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch {torch.__version__}, 1 thread; "
        f"store: {args.store}"
    )
    print(f"defense phase of a sweep of {n} / {2 * n} CLP trials: {phases[n]:.1f} s / {phases[2 * n]:.1f} s")
    print(f"one more trial in a sweep: {sweep_per_trial:.2f} s; in a plain loop: {loop_per_trial:.2f} s")
    print(f"once per phase (Tune run, first actor's imports and model load): {fixed:.1f} s")
    print(
        f"platform overhead per trial: {sweep_per_trial - loop_per_trial:.2f} s "
        "(target <= 0.5 s once the cluster is up)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
