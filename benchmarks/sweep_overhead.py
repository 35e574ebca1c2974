"""Platform overhead per trial: a sweep of N small trials against the same trial function called N
times in a loop, one process (one trial at a time) on each side.

    .venv/bin/python benchmarks/sweep_overhead.py            # N = 20 CLP trials on a tiny digits model
    .venv/bin/python benchmarks/sweep_overhead.py --trials 40

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
    parser.add_argument("--trials", type=int, default=20)
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

        timed = parse_sweep(spec("overhead", args.trials))
        started = time.perf_counter()
        run_sweep(timed, results=results, out=quiet)
        sweep_s = time.perf_counter() - started
        ray.shutdown()

        store = Store.open(results)
        folder = fetch_attacked(
            store, find_attacked(store, cache_key(timed.attack_cells[0].identity())), Path(tmp) / "a"
        )
        attacked = load_attacked(folder, "cpu")
        started = time.perf_counter()
        for _ in range(args.trials):
            run_defense(DefenseSpec("clp", {}, device="cpu"), attacked)
        loop_s = time.perf_counter() - started

    per_trial = (sweep_s - loop_s) / args.trials
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; torch {torch.__version__}, 1 thread"
    )
    print(f"{args.trials} CLP trials: sweep {sweep_s:.1f} s, loop {loop_s:.1f} s")
    print(f"platform overhead per trial: {per_trial:.2f} s (target <= 0.5 s once the cluster is up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
