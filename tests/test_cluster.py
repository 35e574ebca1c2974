"""Sweeps on a real multi-node Ray cluster on this machine, tracked by the real team service.

- Ray: a head that takes no trials and two worker raylets, each `ray start --block` in a process
  group of its own (so a node can be removed by killing its group), with distinct custom resources,
  one declared (fake) GPU each, and Ray's token authentication on every node and the driver.
- `bdlab server start --host 0.0.0.0`: PostgreSQL under the test's folder, MLflow with basic
  authentication and artifacts proxied into a folder that no worker reads; a writer and a reader.
- The driver is the command line (`bdlab sweep --address HEAD`), as `ray job submit` runs it on the
  head, with the tracking server given on loopback: the platform names it by the node's address
  for the workers.

Nothing is mocked. Trials ask 0.5 CPU and 0.5 GPU: two at a time on each worker node.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from test_service import ADMIN_PASSWORD, SECRETS, add_user, bdlab, call, start_service

pytestmark = [
    pytest.mark.sweep,
    pytest.mark.skipif(
        shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
        reason="PostgreSQL server programs are not installed (.ci/run installs them)",
    ),
]

RAY = str(Path(sys.executable).parent / "ray")
RAY_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(16),
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}
WRITER = ("runner", "runner-password-123")
READER = ("viewer", "viewer-password-123")
ATTACK = {"name": "badnets", "params": {"ratio": 0.2}}


# --- the tracking service -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from bdlab.servers import free_port

    root = tmp_path_factory.mktemp("team-service")
    port = free_port()
    start_service(root, port, "--host", "0.0.0.0")
    for (name, password), role in ((WRITER, "writer"), (READER, "reader")):
        added = add_user(root, name, role, password)
        assert added.returncode == 0, added.stderr
    state = json.loads((root / "service.json").read_text())
    optuna_url = f"postgresql+psycopg://bdlab:{SECRETS['BDLAB_DB_PASSWORD']}@{state['postgres']}/optuna"
    yield {
        "root": root,
        "url": f"http://127.0.0.1:{port}",
        "port": port,
        "optuna": optuna_url,
        "state": state,
    }
    bdlab("server", "stop", "--root", str(root))


def admin_tracker(url: str, monkeypatch):
    """A tracker with the admin's login (set for this test only: later tests' stores must not see it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    from bdlab.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(url)


# --- the Ray cluster --------------------------------------------------------------------------------


class RayNodes:
    """`ray start --block` processes: the head and named worker nodes."""

    def __init__(self) -> None:
        from bdlab.servers import free_port

        self.temp = tempfile.mkdtemp(prefix="bdray-", dir="/tmp")  # socket paths must stay short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}  # worker name -> Ray node id
        self.start(
            "head",
            [
                "--head",
                "--include-dashboard=false",
                f"--port={self.port}",
                "--num-cpus=0",
                "--num-gpus=0",
                f"--temp-dir={self.temp}",
            ],
        )
        self.wait_nodes(1)

    def start(self, name: str, args: list[str]) -> None:
        log = open(Path(self.temp) / f"{name}.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--object-store-memory=80000000", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **RAY_ENV},
            start_new_session=True,
        )
        log.close()

    def add_worker(self, name: str) -> None:
        """A worker node with one CPU, one fake GPU and the custom resource `node_<name>`; the
        agents' ports are its own (two raylets share this machine)."""
        from bdlab.servers import free_port

        ports = [free_port() for _ in range(4)]
        before = len(self.alive())
        self.start(
            name,
            [
                f"--address={self.address}",
                "--num-cpus=1",
                "--num-gpus=1",
                f"--resources={json.dumps({f'node_{name}': 1})}",
                f"--dashboard-agent-listen-port={ports[0]}",
                f"--dashboard-agent-grpc-port={ports[1]}",
                f"--runtime-env-agent-port={ports[2]}",
                f"--metrics-export-port={ports[3]}",
            ],
        )
        self.wait_nodes(before + 1)
        resource = f"node_{name}"
        found = self.query(
            f"[n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get({resource!r})]"
        )
        self.node_ids[name] = found[0]

    def remove(self, name: str) -> None:
        """The node dies at once: its raylet and workers are killed (SIGKILL to its process group)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.node_ids.pop(name, None)

    def query(self, expression: str):
        """`expression`'s JSON value in a driver connected to the cluster (a process of its own:
        the test's process stays out of Ray)."""
        script = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            f"print(json.dumps({expression}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, **RAY_ENV},
            timeout=120,
        )
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None

    def alive(self) -> list[dict]:
        return self.query("[n['Resources'] for n in ray.nodes() if n['Alive']]") or []

    def wait_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive()) < count:
            assert time.monotonic() < deadline, f"{count} Ray nodes did not come up (logs: {self.temp})"
            time.sleep(2)

    def stop(self) -> None:
        for name in list(self.procs):
            self.remove(name)
        shutil.rmtree(self.temp, ignore_errors=True) if os.environ.get("KEEP") is None else None


@pytest.fixture(scope="module")
def nodes(service):
    nodes = RayNodes()
    try:
        nodes.add_worker("a")
        nodes.add_worker("b")
        yield nodes
    finally:
        nodes.stop()


# --- the sweep, as the head runs it -------------------------------------------------------------------


def write_spec(folder: Path, name: str, trials: int, epochs: int) -> Path:
    spec = {
        "name": name,
        "datasets": [{"name": "digits", "params": {"train_subset": 60, "test_subset": 40}}],
        "models": ["mini_resnet"],
        "attacks": [ATTACK],
        "seeds": [0],
        "attack_training": {"epochs": 1},
        "defenses": [
            {
                "name": "ft",
                "preset": "smoke",
                "trials": trials,
                "fixed": {"epochs": epochs},
                "space": {"lr": {"float": [0.001, 0.05], "log": True}},
            }
        ],
        "resources": {"attack": {"cpu": 1, "gpu": 0}, "defense": {"cpu": 0.5, "gpu": 0.5}},
        "failure": {"max_retries": 2},
        "device": "cpu",
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_command(spec: Path, results: Path, service: dict, nodes: RayNodes) -> list[str]:
    return [
        sys.executable, "-m", "bdlab.cli", "sweep", str(spec),
        "--results", str(results),
        "--tracking-uri", service["url"],
        "--optuna-storage", service["optuna"],
        "--address", nodes.address,
    ]  # fmt: skip


def sweep_env(login: tuple[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BDLAB_"))}
    return {**env, **RAY_ENV, "MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]}


def start_sweep(spec: Path, results: Path, service: dict, nodes: RayNodes) -> subprocess.Popen:
    return subprocess.Popen(
        sweep_command(spec, results, service, nodes),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=sweep_env(WRITER),
    )


def defense_runs(tracker, sweep: str, statuses=("FINISHED", "FAILED", "RUNNING", "KILLED")):
    from bdlab.tracking import schema

    exp = tracker.find_experiment(schema.sweep_experiment(sweep))
    return [] if exp is None else tracker.find_runs([exp], {schema.PHASE: "defense"}, statuses=statuses)


def wait_for(condition, what: str, sweep: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert sweep.poll() is None, f"the sweep ended before {what}: {sweep.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def finish(sweep: subprocess.Popen, timeout_s: float = 600) -> str:
    out, _ = sweep.communicate(timeout=timeout_s)
    assert sweep.returncode == 0, out[-4000:]
    print(out)  # shown with -s, or when a later assertion fails
    return out


def assert_complete_once(service: dict, tracker, name: str, trials: int) -> list:
    """Every trial completed exactly once: as many COMPLETE Optuna trials and FINISHED MLflow runs
    as the budget, one run per trial number, each with its metrics, params, tags and artifacts."""
    from bdlab.studies import optuna_storage
    from bdlab.tracking import schema

    storage = optuna_storage(service["optuna"])
    study_names = [
        s.study_name for s in optuna.get_all_study_summaries(storage) if f":{name}:" in f":{s.study_name}"
    ]
    assert len(study_names) == 1, study_names
    states = [t.state.name for t in optuna.load_study(study_name=study_names[0], storage=storage).trials]
    assert states == ["COMPLETE"] * trials
    runs = defense_runs(tracker, name)
    assert sorted(int(r.tags[schema.TRIAL]) for r in runs) == list(range(trials))
    for run in runs:
        assert run.status == "FINISHED" and run.tags[schema.STATUS] == "complete"
        assert {"acc", "asr", "val_acc", "val_asr", "before_acc"} <= set(run.metrics)
        assert "epochs" in run.params and run.tags[schema.RAY_NODE] and run.tags[schema.TORCH]
        assert set(tracker.list_artifacts(run.run_id, "defended")) >= {
            "defended/model.safetensors",
            "defended/metrics.json",
        }
    return runs


# --- (a) to (d): trials on several nodes; a node, MLflow and PostgreSQL lost mid-sweep --------------


def test_a_sweep_spreads_over_the_nodes_and_survives_losing_a_node_mlflow_and_postgresql(
    service, nodes, tmp_path, monkeypatch
):
    """One sweep, four events: it spreads over both worker nodes (a); a worker node dies with the
    trial it has just started (b); then MLflow's server is killed and started again (c), and
    PostgreSQL is restarted under it and under the driver's Optuna storage (d). Every trial
    completes exactly once."""
    from bdlab.postgres import LocalPostgres, default_user
    from bdlab.tracking import schema

    resources = nodes.alive()
    assert sum(r.get("GPU", 0) for r in resources) == 2 and {"node_a", "node_b"} <= {
        k for r in resources for k in r
    }
    tracker = admin_tracker(service["url"], monkeypatch)
    trials = 10
    sweep = start_sweep(
        write_spec(tmp_path, "spread", trials, epochs=12), tmp_path / "results", service, nodes
    )
    # (b) a worker node that finished a trial dies while it runs another
    names = {node_id: name for name, node_id in nodes.node_ids.items()}

    def busy_node() -> str | None:
        """A worker node that finished a trial and has just started another: tagged with the node,
        no progress logged yet (the first record comes after the first of its 12 epochs), so the
        node dies with the trial running."""
        runs = defense_runs(tracker, "spread")
        finished = {r.tags.get(schema.RAY_NODE) for r in runs if r.status == "FINISHED"}
        for r in runs:
            node = r.tags.get(schema.RAY_NODE)
            if r.status == "RUNNING" and node in names and node in finished and not r.metrics:
                return node
        return None

    lost = None

    def a_node_is_busy() -> bool:
        nonlocal lost
        lost = busy_node()
        return lost is not None

    wait_for(a_node_is_busy, "a node that finished one trial and has just started another", sweep)
    nodes.remove(names[lost])
    # (c) MLflow's server dies and comes back (the service's start restarts what is not running)
    root = service["root"]
    os.kill(json.loads((root / "service.json").read_text())["pid"], signal.SIGKILL)
    time.sleep(2)
    again = bdlab("server", "start", "--root", str(root), "--port", str(service["port"]), "--host", "0.0.0.0")
    assert again.returncode == 0, again.stderr
    # (d) PostgreSQL restarts under the server and under the driver's Optuna storage
    assert sweep.poll() is None, "the sweep ended before PostgreSQL's restart"
    host, port = service["state"]["postgres"].rsplit(":", 1)
    postgres = LocalPostgres(root / "postgres", host, int(port), default_user())
    postgres.stop()
    time.sleep(2)
    postgres.start()

    out = finish(sweep)

    runs = assert_complete_once(service, tracker, "spread", trials)
    # (a) the trials ran on both worker nodes (never on the head) and record where they ran
    assert {r.tags[schema.RAY_NODE] for r in runs} == set(names), [r.tags[schema.RAY_NODE] for r in runs]
    for run in runs:
        assert run.tags[schema.HOST] and run.tags[schema.DEVICE] == "cpu" and run.tags[schema.GPU] == "none"
    # (b) a trial that ran on the lost node was retried on the other one, in its own run
    retried = [r for r in runs if int(r.tags[schema.ATTEMPT]) > 1]
    assert retried and all(r.tags[schema.RAY_NODE] != lost for r in retried), [r.tags for r in runs]
    assert "retrying ft#" in out
    # every artifact downloads through the server, whose folder no worker read (proxied locations)
    exp = tracker.find_experiment(schema.sweep_experiment("spread"))
    assert tracker.artifact_location(exp).startswith("mlflow-artifacts:")
    for run in runs:
        folder = tracker.download_folder(run.run_id, "defended", tmp_path / "download" / run.run_id)
        assert (folder / "model.safetensors").stat().st_size > 1000 and (folder / "metrics.json").is_file()
    # the experiment opens on the runs table, with the objectives as the saved view's columns
    tags = tracker.client.get_experiment(exp).tags
    assert tags[schema.EXPERIMENT_KIND] == schema.MODEL_TRAINING
    view = json.loads(json.loads(tags[schema.SAVED_VIEW_PREFIX + schema.RESULTS_VIEW])["state"])
    assert view["selectedColumns"][:4] == [
        "metrics.`acc`",
        "metrics.`asr`",
        "metrics.`val_acc`",
        "metrics.`val_asr`",
    ]
    assert f"runs?viewStateShareKey={schema.RESULTS_VIEW}" in out


# --- (e) who may use the service ----------------------------------------------------------------------


def test_logins_are_checked_before_any_training(service, nodes, tmp_path, monkeypatch):
    from bdlab.tracking import schema

    url = service["url"]
    assert call(url, "/api/2.0/mlflow/experiments/search?max_results=5") == 401  # anonymous
    assert call(url, "/api/2.0/mlflow/experiments/search?max_results=5", ":".join(READER)) == 200
    tracker = admin_tracker(url, monkeypatch)
    attack_exp = tracker.experiment_id(schema.ATTACK_EXPERIMENT)
    attacks_before = len(tracker.find_runs([attack_exp], {}, statuses=None))
    spec = write_spec(tmp_path, "logins", 2, epochs=1)
    cases = {
        (
            WRITER[0],
            "a-wrong-password",
        ): f"bdlab: error: tracking server {url}: refused the login of 'runner' (HTTP 401",
        READER: f"bdlab: error: tracking server {url}: 'viewer' may not write there (HTTP 403",
    }
    for login, expected in cases.items():
        done = subprocess.run(
            sweep_command(spec, tmp_path / "results", service, nodes),
            capture_output=True,
            text=True,
            env=sweep_env(login),
            timeout=300,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().startswith(expected) and len(done.stderr.strip().splitlines()) == 1, (
            done.stderr
        )
    assert len(tracker.find_runs([attack_exp], {}, statuses=None)) == attacks_before  # nothing trained
    assert defense_runs(tracker, "logins") == []
