"""Tracking-path benchmark: concurrent writers logging what a defense trial logs, against the local
SQLite store and against the team service (`bdlab server`: MLflow with logins on PostgreSQL).

    .venv/bin/python benchmarks/tracking.py                       # 1, 8 and 32 writers, both stores
    .venv/bin/python benchmarks/tracking.py --writers 1 8 --trials 4 --json out.json

A writer is a process that runs `--trials` trials one after another, each through the platform's
`Tracker` exactly as `bdlab.worker.defense_trial` does: open the run (its tags and params), read
it, mark it RUNNING with the placement tags, log `--steps` progress records, upload the four files
of a defended model (weights, metrics, spec, trigger) and end the run with its ~40 final metrics.
Per store and writer count it prints: trials per second over the whole run, the median and p95
seconds of one trial's tracking calls, errors (an exception in any call; there must be none), and
for the server the peak number of PostgreSQL connections (sampled every 0.2 s from
`pg_stat_activity`) against `max_connections`.

The service needs PostgreSQL's programs (initdb, pg_ctl) and the `cluster` extra; it is started
under a temporary folder with the secrets set here, and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

SECRETS = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": "benchmark-admin-password",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "benchmark-flask-secret",
    "BDLAB_DB_PASSWORD": "benchmark-db-password",
}


def one_trial(tracker, experiment: str, parent: str, number: int, steps: int, files: Path) -> None:
    """The tracking calls of one defense trial (bdlab.worker.defense_trial and bdlab.sweep)."""
    from bdlab.tracking import schema
    from bdlab.worker import placement_tags

    tags = {
        schema.SWEEP: "bench",
        schema.PHASE: "defense",
        schema.GENERATION: "1",
        schema.DATASET: "digits",
        schema.MODEL: "mini_resnet",
        schema.ATTACK: "badnets",
        schema.DEFENSE: "ft",
        schema.CELL: "digits/mini_resnet/badnets/s0 :: ft",
        schema.CACHE_KEY: "0" * 20,
        schema.STUDY: "bench",
        schema.TRIAL: str(number),
        schema.DEFAULT: "false",
        schema.STATUS: "running",
    }
    params = {"defense": "ft", "lr": 0.01, "epochs": 20, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4}
    run_id = tracker.create_run(experiment, f"ft#{number}", tags=tags, params=params, parent_run_id=parent)
    tracker.get_run(run_id)
    tracker.set_status(run_id, "RUNNING")
    tracker.set_tags(run_id, placement_tags("cpu"))
    for step in range(1, steps + 1):
        tracker.log_metrics(run_id, {"val_acc": 0.9, "val_asr": 0.1, "loss": 1.0 / step}, step=step)
    tracker.log_folder(run_id, files, "defended")
    final = {f"{prefix}{name}": 0.5 for prefix in ("", "val_", "before_") for name in METRICS}
    tracker.finish_run(run_id, "FINISHED", tags={schema.STATUS: "complete"}, metrics={**final, "seconds": 12.0})


# the registered metrics of a trial's three halves: ~40 final metrics in all
METRICS = ["acc", "asr", "asr_cond", "asr_paper", "ra", "asr_x4", "asr_x5", "asr_x9", "asr_x4_cond", "asr_x5_cond", "asr_x9_cond", "penultimate_shift", "der"]  # fmt: skip


def defended_files(folder: Path) -> Path:
    """Four files the size of a digits mini_resnet's defended folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(os.urandom(700_000))
    (folder / "metrics.json").write_text(json.dumps({m: 0.5 for m in METRICS}))
    (folder / "spec.yaml").write_text("defense: ft\nparams: {lr: 0.01}\n" * 10)
    (folder / "trigger.png").write_bytes(os.urandom(2_000))
    return folder


def writer(args: tuple) -> tuple[list[float], list[str]]:
    store_config, experiment, parent, first, trials, steps, files, start_at = args
    from bdlab.tracking import Store
    from bdlab.worker import placement_tags

    tracker = Store.from_config(store_config).tracker()
    placement_tags("cpu")  # imports torch and ray now, outside the timed trials, as a worker has
    tracker.client  # noqa: B018 - and MLflow's client
    while time.time() < start_at:  # every writer starts together
        time.sleep(0.01)
    seconds, errors = [], []
    for i in range(trials):
        began = time.perf_counter()
        try:
            one_trial(tracker, experiment, parent, first + i, steps, Path(files))
        except Exception as err:  # noqa: BLE001 - every failure is a finding of the benchmark
            errors.append(f"{type(err).__name__}: {str(err)[:200]}")
        seconds.append(time.perf_counter() - began)
    return seconds, errors


class ConnectionSampler(threading.Thread):
    """The peak number of PostgreSQL backends serving clients, sampled while the writers run."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.peak, self.stop_flag = host, port, 0, threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user="bdlab", password=SECRETS["BDLAB_DB_PASSWORD"], dbname="postgres"
        ) as conn:
            conn.autocommit = True
            while not self.stop_flag.is_set():
                count = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                ).fetchone()[0]
                self.peak = max(self.peak, int(count) - 1)  # not this sampler's own connection
                time.sleep(0.2)


def measure(store, writers: int, trials: int, steps: int, files: Path, sampler_at=None) -> dict:
    from bdlab.tracking import schema

    tracker = store.tracker()
    experiment = tracker.experiment_id(f"bdlab/bench-{writers}-{time.time_ns()}", schema.experiment_tags())
    parent = tracker.create_run(experiment, "bench", tags={schema.KIND: "sweep"})
    sampler = ConnectionSampler(*sampler_at) if sampler_at else None
    if sampler:
        sampler.start()
    start_at = time.time() + 10.0 + writers * 0.5  # after every writer's imports
    jobs = [
        (store.as_config(), experiment, parent, w * trials, trials, steps, str(files), start_at) for w in range(writers)
    ]
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        results = pool.map(writer, jobs)
        wall = time.time() - start_at
    if sampler:
        sampler.stop_flag.set()
        sampler.join()
    seconds = sorted(s for r in results for s in r[0])
    errors = [e for r in results for e in r[1]]
    return {
        "writers": writers,
        "trials": len(seconds),
        "trials_per_s": round(len(seconds) / wall, 2),
        "median_s": round(statistics.median(seconds), 3),
        "p95_s": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 3),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "peak_pg_connections": sampler.peak if sampler else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--trials", type=int, default=3, help="trials per writer")
    parser.add_argument("--steps", type=int, default=10, help="progress records per trial")
    parser.add_argument("--server-workers", type=int, default=4, help="`bdlab server start --workers`")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "server"], choices=["sqlite", "server"])
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.update(SECRETS)
    from bdlab.tracking.mlflow_tracker import QUIET_MLFLOW_ENV

    os.environ.update(QUIET_MLFLOW_ENV)  # the writers inherit it: no "View run" lines
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")

    from bdlab import service
    from bdlab.postgres import MAX_CONNECTIONS
    from bdlab.servers import free_port
    from bdlab.tracking import Store

    rows = []
    with tempfile.TemporaryDirectory(prefix="bdlab-bench-") as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o711)  # PostgreSQL runs as `postgres` when we are root
        files = defended_files(tmp_path / "defended")
        for kind in args.stores:
            if kind == "sqlite":
                store = Store.open(tmp_path / "sqlite")
                sample = None
            else:
                root = tmp_path / "service"
                state = service.start(root, port=free_port(), workers=args.server_workers)
                os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
                os.environ["MLFLOW_TRACKING_PASSWORD"] = SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"]
                store = Store.open(tmp_path / "server-results", state.tracking_uri, "sqlite:///" + str(tmp_path / "o.db"))
                host, port = state.postgres.rsplit(":", 1)
                sample = (host, int(port))
            try:
                for writers in args.writers:
                    row = {"store": kind, **measure(store, writers, args.trials, args.steps, files, sample)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                if kind == "server":
                    service.stop(root)
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; {args.trials} trials per writer, {args.steps} steps each")
    print("| store | writers | trials/s | median s/trial | p95 s/trial | errors | peak PostgreSQL connections |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_pg_connections"] is None else f"{r['peak_pg_connections']} of {MAX_CONNECTIONS}"
        print(
            f"| {r['store']} | {r['writers']} | {r['trials_per_s']} | {r['median_s']} | {r['p95_s']} | {r['errors']} | {peak} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
