"""Platform overhead per trial: a sweep of N small trials against the same trial function called N
times in a loop, one process (one trial at a time) on each side.

    .venv/bin/python benchmarks/sweep_overhead.py            # sweeps of 15 and 30 CLP trials, tiny digits model
    .venv/bin/python benchmarks/sweep_overhead.py --trials 30

Both sides run `trials.run.run_defense` with CLP (data-free, about a second) on the same attacked
model. The sweep side adds everything the platform does per trial: the searcher's Optuna ask/tell
(SQLite storage), scheduling the trial on a reused Ray actor, the MLflow child run (params, step and
final metrics, the defended model and spec as artifacts, local SQLite store), progress lines. The
Ray cluster (1 CPU, so one trial at a time) is started before the clock starts: the target is the
overhead "once the cluster is up". The attacked model is cached by a warm-up sweep first, so the
timed sweep is phase 2 (plus the summary, Pareto plots and Parquet table at its end, which are
counted in: a per-sweep cost spread over N trials).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15, help="N: sweeps of N and 2N trials are timed")
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
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        run_sweep(parse_sweep(spec("warmup", 1)), results=results, out=quiet)  # trains and caches the model

        # two sweeps, N and 2N trials: the slope is the cost of one more trial, apart from the
        # once-per-phase costs (a Tune run, its first actor importing torch, loading the model)
        phases = {}
        for n in (args.trials, 2 * args.trials):
            summary = run_sweep(parse_sweep(spec(f"overhead{n}", n)), results=results, out=quiet)
            phases[n] = summary["seconds"]["defense_phase"]
        ray.shutdown()

        store = Store.open(results)
        key = cache_key(parse_sweep(spec("x", 1)).attack_cells[0].identity())
        attacked = load_attacked(fetch_attacked(store, find_attacked(store, key), Path(tmp) / "a"), "cpu")
        started = time.perf_counter()
        for _ in range(args.trials):
            run_defense(DefenseSpec("clp", {}, device="cpu"), attacked)
        loop_per_trial = (time.perf_counter() - started) / args.trials

    n = args.trials
    sweep_per_trial = (phases[2 * n] - phases[n]) / n
    fixed = phases[n] - n * sweep_per_trial
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch {torch.__version__}, 1 thread"
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
