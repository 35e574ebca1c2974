"""The tracking store (MLflow + Optuna DB), attacked-model cache keys and the race-free claim, against
real components: a local SQLite store and a real `mlflow server` on loopback (conftest fixtures)."""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
import time

import pytest
from bdlab import cache, claims
from bdlab.sweep import parent_run
from bdlab.testing import TrackerContract, small_folder, unique
from bdlab.tracking import Store, Tracker, schema

from trials.errors import InvalidValue


@pytest.fixture(params=["local", "server"])
def store(request) -> Store:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def tracker(store) -> Tracker:
    return store.tracker()


class TestLocalTracker(TrackerContract):
    @pytest.fixture
    def tracker(self, local_store) -> Tracker:
        return local_store.tracker()


class TestServerTracker(TrackerContract):
    @pytest.fixture
    def tracker(self, server_store) -> Tracker:
        return server_store.tracker()


# --- the store -----------------------------------------------------------------------------------


def test_open_creates_the_local_store_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    results = tmp_path / "results"
    store = Store.open(results)
    assert store.results == results.resolve()
    assert store.tracking_uri == f"sqlite:///{results / 'mlflow.db'}"
    assert store.optuna_url == f"sqlite:///{results / 'optuna.db'}"
    assert store.artifact_root == (results / "mlartifacts").as_uri()
    assert (results / "mlflow.db").is_file() and (results / "optuna.db").is_file()
    assert Store.open(results) == store  # opening twice is fine

    tracker = store.tracker()
    exp = tracker.experiment_id("bdlab/some sweep")
    assert tracker.experiment_id("bdlab/some sweep") == exp
    assert tracker.artifact_location(exp) == f"{store.artifact_root}/bdlab/some_sweep"
    assert store.env() == {"MLFLOW_TRACKING_URI": store.tracking_uri}
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # no mlflow.set_experiment behind our back

    import optuna

    study = optuna.create_study(storage=store.optuna_url, study_name="s", directions=["maximize", "minimize"])
    assert optuna.load_study(study_name="s", storage=store.optuna_url).directions == study.directions


def test_open_precedence_and_worker_env(tmp_path, monkeypatch, mlflow_server_uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    remote = Store.open(tmp_path / "a")
    assert remote.tracking_uri == mlflow_server_uri and remote.artifact_root is None
    assert remote.env() == {
        "MLFLOW_TRACKING_URI": mlflow_server_uri,
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "secret",
    }
    local_uri = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    assert Store.open(tmp_path / "b", tracking_uri=local_uri).tracking_uri == local_uri  # argument wins


@pytest.mark.parametrize("uri", ["mlruns", "/abs/mlruns", "file:///abs/mlruns"])
def test_open_refuses_file_stores(tmp_path, uri):
    with pytest.raises(InvalidValue, match="file stores"):
        Store.open(tmp_path, tracking_uri=uri)


def test_a_servers_experiments_keep_artifacts_behind_its_proxy(server_store):
    tracker = server_store.tracker()
    exp = tracker.experiment_id(unique("bdlab/proxied"))
    assert tracker.artifact_location(exp).startswith("mlflow-artifacts:")


def test_experiments_open_on_the_runs_table_with_the_objectives_as_columns(local_store):
    import json

    tracker = local_store.tracker()
    older = tracker.experiment_id(unique("bdlab/older"))  # made before the tags existed
    tags = schema.experiment_tags({"acc": "max", "asr": "min"})
    for exp in (
        tracker.experiment_id(unique("bdlab/new"), tags),
        tracker.experiment_id(tracker.client.get_experiment(older).name, tags),
    ):
        held = tracker.client.get_experiment(exp).tags
        assert held[schema.EXPERIMENT_KIND] == "custom_model_development"
        envelope = json.loads(held["mlflow.sharedViewState.bdlab-results"])
        assert envelope["name"] == "bdlab: results" and isinstance(envelope["createdAt"], int)
        assert json.loads(envelope["state"]) == {
            "orderByKey": "metrics.`val_acc`",
            "orderByAsc": False,
            "selectedColumns": [
                "metrics.`acc`",
                "metrics.`asr`",
                "metrics.`val_acc`",
                "metrics.`val_asr`",
                "tags.`bdlab.defense`",
                "tags.`bdlab.cell`",
                "tags.`bdlab.status`",
            ],
        }
    minimize_first = json.loads(
        json.loads(schema.experiment_tags({"asr": "min"})[schema.SAVED_VIEW_PREFIX + "bdlab-results"])[
            "state"
        ]
    )
    assert minimize_first["orderByKey"] == "metrics.`val_asr`" and minimize_first["orderByAsc"] is True
    assert schema.experiment_tags() == {schema.EXPERIMENT_KIND: "custom_model_development"}


def test_a_loopback_server_is_named_by_the_address_other_nodes_reach(tmp_path):
    server = Store(tmp_path, "http://127.0.0.1:5000", "sqlite:///x", None)
    assert server.is_loopback and not server.at_host("10.0.0.5").is_loopback
    assert server.at_host("10.0.0.5").tracking_uri == "http://10.0.0.5:5000"
    assert (
        Store(tmp_path, "http://localhost", "sqlite:///x", None).at_host("10.0.0.5").tracking_uri
        == "http://10.0.0.5"
    )
    assert not Store(tmp_path, "http://10.0.0.5:5000", "sqlite:///x", None).is_loopback
    assert not Store(tmp_path, "sqlite:////r/mlflow.db", "sqlite:///x", None).is_loopback


def test_a_servers_refusal_is_one_line_naming_the_server_and_the_login(monkeypatch):
    from bdlab.tracking.mlflow_tracker import access_error
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

    url = "http://10.0.0.5:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    anonymous = access_error(MlflowException("401", error_code=UNAUTHENTICATED), url)
    assert str(anonymous) == (
        f"tracking server {url}: needs a login; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (HTTP 401)"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    wrong = access_error(MlflowException("401", error_code=UNAUTHENTICATED), url)
    assert str(wrong).startswith(f"tracking server {url}: refused the login of 'ann' (HTTP 401")
    reader = access_error(MlflowException("403", error_code=PERMISSION_DENIED), url)
    assert str(reader).startswith(f"tracking server {url}: 'ann' may not write there (HTTP 403")
    assert "\n" not in str(reader)
    assert access_error(MlflowException("404", error_code=RESOURCE_DOES_NOT_EXIST), url) is None
    assert access_error(ValueError("not MLflow's"), url) is None


# --- runs ----------------------------------------------------------------------------------------


def test_parent_run_reuse_and_generations(tracker):
    exp = tracker.experiment_id(schema.sweep_experiment(unique("sweep")))
    first = parent_run(tracker, exp, "s1", tags={schema.SPEC: "a"})
    assert parent_run(tracker, exp, "s1") == first
    assert parent_run(tracker, exp, "other") != first
    tracker.finish_run(first)
    assert parent_run(tracker, exp, "s1") == first  # a finished parent is resumed
    second = parent_run(tracker, exp, "s1", fresh=True)
    assert second != first
    assert parent_run(tracker, exp, "s1") == second  # the newest generation
    tags = tracker.get_run(second).tags
    assert tags[schema.GENERATION] == "2" and tags[schema.KIND] == "sweep"
    assert tracker.get_run(first).tags[schema.GENERATION] == "1"


# --- cache keys ----------------------------------------------------------------------------------

CELL = {
    "dataset": {"name": "digits", "params": {}},
    "model": "mini_resnet",
    "attack": {"name": "badnets", "params": {"ratio": 0.1}},
    "seed": 0,
}


def test_cache_key_stable_and_sensitive(monkeypatch):
    key = cache.cache_key(CELL)
    assert len(key) == 20 and int(key, 16) >= 0
    reordered = dict(reversed(list(CELL.items())))
    assert cache.cache_key(reordered) == key
    changed = [
        {**CELL, "seed": 1},
        {**CELL, "model": "resnet18"},
        {**CELL, "attack": {"name": "badnets", "params": {"ratio": 0.2}}},
        {**CELL, "dataset": {"name": "digits", "params": {"train_subset": 60}}},
        {**CELL, "extra": None},
    ]
    assert len({key, *(cache.cache_key(c) for c in changed)}) == len(changed) + 1
    assert cache.cache_key(CELL, device_kind="cuda") != key
    with pytest.raises(InvalidValue, match="cache identity"):
        cache.cache_key({**CELL, "x": float("nan")})

    monkeypatch.setattr(cache, "_default_code_version", lambda: "0" * 16)
    assert cache.cache_key(CELL) != key  # new code, new key


def test_code_version_over_files(tmp_path):
    default = cache.code_version()
    assert len(default) == 16 and cache.code_version() == default
    assert cache.code_version(cache.CODE_VERSION_FILES, cache._source_root()) == default
    rel = {p.as_posix() for p in cache.code_files()}
    assert {
        "trials/run/attack.py",
        "trials/training.py",
        "trials/metrics.py",
        "trials/attacks/badnets.py",
    } <= rel
    assert not any("__pycache__" in p or "defenses" in p for p in rel)

    (tmp_path / "trials" / "models" / "__pycache__").mkdir(parents=True)
    (tmp_path / "trials" / "models" / "a.py").write_text("A = 1\n")
    (tmp_path / "trials" / "run").mkdir()
    (tmp_path / "trials" / "run" / "attack.py").write_text("R = 1\n")
    v1 = cache.code_version(root=tmp_path)
    (tmp_path / "trials" / "models" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "trials" / "defense.py").write_text("not part of an attacked model\n")
    assert cache.code_version(root=tmp_path) == v1
    (tmp_path / "trials" / "models" / "a.py").write_text("A = 2\n")
    assert cache.code_version(root=tmp_path) != v1


# --- claiming an attacked model --------------------------------------------------------------------


def test_claim_reuse_failure_and_stale_claims(local_store, tmp_path):
    store, key = local_store.tracker(), unique("key")
    run, trained = cache.claim_attacked(store, key, "badnets", {"bdlab.dataset": "digits"}, poll_s=0.1)
    assert trained and cache.find_attacked(store, key) is None
    store.finish_run(run, "FAILED")  # the training failed: the next claimant trains again
    retry, trained = cache.claim_attacked(store, key, "badnets", {}, poll_s=0.1)
    assert trained and retry != run
    claims.heartbeat(store, retry)
    cache.log_attacked(store, retry, small_folder(tmp_path / "m"))
    store.finish_run(retry)
    assert cache.claim_attacked(store, key, "badnets", {}, poll_s=0.1) == (retry, False)
    assert cache.find_attacked(store, key) == retry
    tags = store.get_run(retry).tags
    assert (
        tags[schema.CACHE_KEY] == key
        and tags[schema.KIND] == "attack"
        and tags[schema.CODE_VERSION] == cache.code_version()
    )

    # a claimant that died without a heartbeat for stale_s is ended and replaced
    key2 = unique("key")
    dead = store.create_run(
        store.experiment_id(schema.ATTACK_EXPERIMENT),
        "dead claimant",
        tags={schema.CACHE_KEY: key2, schema.HEARTBEAT: f"{time.time() - 100:.0f}"},
    )
    fresh, trained = cache.claim_attacked(store, key2, "badnets", {}, poll_s=0.1, stale_s=30)
    assert trained and fresh != dead and store.get_run(dead).status == "KILLED"


def test_claim_waits_for_a_live_winner(local_store, tmp_path):
    store, key = local_store.tracker(), unique("key")
    winner, trained = cache.claim_attacked(store, key, "badnets", {}, poll_s=0.1)
    assert trained

    def train_then_finish() -> None:
        time.sleep(1.5)
        cache.log_attacked(store, winner, small_folder(tmp_path / "m"))
        store.finish_run(winner)

    thread = threading.Thread(target=train_then_finish)
    thread.start()
    started = time.monotonic()
    assert cache.claim_attacked(store, key, "badnets", {}, poll_s=0.1) == (winner, False)
    assert time.monotonic() - started > 0.5
    thread.join()

    stuck = unique("key")
    assert cache.claim_attacked(store, stuck, "x", {}, poll_s=0.1)[1]  # a live winner that never finishes
    with pytest.raises(cache.ClaimTimeout, match="still being trained"):
        cache.claim_attacked(store, stuck, "x", {}, wait_s=0.5, poll_s=0.1)


def _claim_in_process(store: Store, key: str, folder: str, barrier, results) -> None:
    """One claimant in its own process: the winner 'trains' (logs a small folder) and finishes."""
    try:
        from bdlab import cache
        from bdlab.tracking import schema

        tracker = store.tracker()
        tracker.experiment_id(schema.ATTACK_EXPERIMENT)  # warm up before the start line
        barrier.wait(timeout=300)
        run_id, trained = cache.claim_attacked(
            tracker, key, "race", {"bdlab.test": "race"}, wait_s=300, poll_s=0.2
        )
        if trained:
            time.sleep(1.0)  # the other claimant is waiting meanwhile
            cache.log_attacked(tracker, run_id, folder)
            tracker.finish_run(run_id)
        results.put((run_id, trained))
    except BaseException as err:  # report, so the test fails with the reason instead of a timeout
        results.put(("error", repr(err)))
        raise


def _check_one_winner(store: Tracker, key: str, outcomes: list[tuple[str, bool]]) -> str:
    assert all(run != "error" for run, _ in outcomes), outcomes
    assert sorted(trained for _, trained in outcomes) == [False] * (len(outcomes) - 1) + [True], outcomes
    winner = next(run for run, trained in outcomes if trained)
    assert {run for run, _ in outcomes} == {winner}
    assert cache.find_attacked(store, key) == winner
    exp = store.experiment_id(schema.ATTACK_EXPERIMENT)
    assert [r.run_id for r in store.find_runs([exp], {schema.CACHE_KEY: key}, statuses=None)] == [winner]
    # every loser created a claim (the winner was still training) and withdrew it
    withdrawn = store.find_runs([exp], {schema.CACHE_KEY: key}, statuses=None, deleted=True)
    assert len(withdrawn) >= len(outcomes) - 1
    return winner


def test_claim_race_between_processes(server_store, tmp_path):
    """Two real processes claim one key against the real server at the same moment: one trains."""
    key, folder = unique("race"), small_folder(tmp_path / "attacked")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_in_process, args=(server_store, key, str(folder), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=400) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    winner = _check_one_winner(server_store.tracker(), key, outcomes)
    assert server_store.tracker().get_run(winner).status == "FINISHED"


def test_claim_race_between_threads(server_store, tmp_path):
    """Four claimants released together (threads: cheap, and as concurrent on the server)."""
    key, folder = unique("race"), small_folder(tmp_path / "attacked")
    barrier, outcomes = threading.Barrier(4), []

    def claim() -> None:
        tracker = server_store.tracker()  # one per thread, as one per process on a cluster
        barrier.wait(timeout=60)
        run_id, trained = cache.claim_attacked(tracker, key, "race", {}, wait_s=120, poll_s=0.2)
        if trained:
            time.sleep(0.5)
            cache.log_attacked(tracker, run_id, folder)
            tracker.finish_run(run_id)
        outcomes.append((run_id, trained))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(outcomes) == 4
    _check_one_winner(server_store.tracker(), key, outcomes)


# --- fetching an attacked model --------------------------------------------------------------------


def test_fetch_attacked_model(tracker, tiny_attacked, tmp_path):
    """A real attacked-model folder (trials.run) goes up with the claim and comes back loadable."""
    from trials.run import load_attacked

    key = unique("fetch")
    run_id, trained = cache.claim_attacked(tracker, key, "badnets digits", {}, poll_s=0.1)
    assert trained
    cache.log_attacked(tracker, run_id, tiny_attacked.folder)
    tracker.finish_run(run_id)

    folder = cache.fetch_attacked(tracker, run_id, tmp_path / "cache")
    assert folder == tmp_path / "cache" / key
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_attacked.folder.iterdir())
    loaded = load_attacked(folder, "cpu")
    assert loaded.spec == tiny_attacked.spec and loaded.metrics == tiny_attacked.metrics
    marker = folder / "kept.txt"
    marker.write_text("second call reuses the folder")
    assert cache.fetch_attacked(tracker, run_id, tmp_path / "cache") == folder and marker.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [key]  # no temporary folder left


# --- servers -------------------------------------------------------------------------------------


def test_mlflow_server_starts_and_stops(tmp_path, capsys):
    import urllib.error
    import urllib.request

    from bdlab import servers

    with servers.mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "art", timeout_s=180) as url:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
        remote = Store.open(tmp_path / "results", tracking_uri=url)
        servers.serve_ui(remote)  # a server already is a UI: just say where
        assert url in capsys.readouterr().out
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{url}/health", timeout=5)


# --- one driver per sweep ---------------------------------------------------------------------------


def _lease_run(store: Tracker, sweep: str, **tags: str) -> str:
    """A driver lease as another driver would have left it (tags override the live defaults)."""
    experiment = store.experiment_id(schema.DRIVER_EXPERIMENT)
    all_tags = {schema.KIND: "driver", schema.SWEEP: sweep, **claims.claim_tags(), **tags}
    return store.create_run(experiment, "another driver", tags=all_tags)


def _live_leases(store: Tracker, sweep: str) -> list:
    experiment = store.experiment_id(schema.DRIVER_EXPERIMENT)
    return claims.claims(store, experiment, {schema.KIND: "driver", schema.SWEEP: sweep}, stale_s=1e9)[1]


def test_a_second_driver_of_a_running_sweep_is_refused(local_store):
    store, sweep = local_store.tracker(), unique("sweep")
    with claims.driver_lease(store, sweep) as lease:
        assert store.get_run(lease).status == "RUNNING"
        with pytest.raises(claims.SweepBusy) as refused:
            with claims.driver_lease(store, sweep):
                pytest.fail("two drivers hold one sweep")
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"sweep {sweep}: another driver is running it (host ")
        beat = re.search(rf"pid {os.getpid()}, last heartbeat (\d+) s ago\)", message)
        assert beat and int(beat.group(1)) < 60, message  # fresh: far from the 120 s of silence allowed
        with claims.driver_lease(store, unique("other")):  # other sweeps stay free
            pass
        assert [r.run_id for r in _live_leases(store, sweep)] == [lease]
    assert _live_leases(store, sweep) == []  # released on the way out (also on errors)
    with pytest.raises(RuntimeError), claims.driver_lease(store, sweep):
        raise RuntimeError("the sweep failed")
    assert _live_leases(store, sweep) == []


def test_a_dead_drivers_lease_is_taken_over(local_store):
    import subprocess
    import sys

    store = local_store.tracker()
    # on this host, a process that has ended: taken over at once
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    sweep = unique("sweep")
    dead = _lease_run(store, sweep, **{schema.PID: dead_pid})
    with claims.driver_lease(store, sweep):
        pass
    assert store.get_run(dead).status == "KILLED"

    # on another host: refused while it sends heartbeats, taken over after stale_s of silence
    sweep = unique("sweep")
    recent = _lease_run(store, sweep, **{schema.HOST: "node-7", schema.HEARTBEAT: f"{time.time() - 35:.0f}"})
    with pytest.raises(claims.SweepBusy, match=r"host node-7, pid \d+, last heartbeat \d+ s ago") as busy:
        with claims.driver_lease(store, sweep, stale_s=120):
            pass
    silent = int(re.search(r"last heartbeat (\d+) s ago", str(busy.value)).group(1))
    assert 35 <= silent < 120  # its own heartbeat's age, however long this machine took to get here
    store.set_tags(recent, {schema.HEARTBEAT: f"{time.time() - 200:.0f}"})
    with claims.driver_lease(store, sweep, stale_s=120):
        pass
    assert store.get_run(recent).status == "KILLED"


def test_drivers_started_at_once_leave_one_holder(local_store):
    store, sweep = local_store.tracker(), unique("sweep")
    store.experiment_id(schema.DRIVER_EXPERIMENT)
    barrier, outcomes, settled = threading.Barrier(4), [], threading.Condition()

    def driver() -> None:
        barrier.wait(timeout=60)
        try:
            with claims.driver_lease(store, sweep):
                # hold the lease until every other driver has had its answer (not for a fixed time,
                # which a slow machine outlasts); with two holders neither sees three answers, and
                # the wait times out into the failing count
                with settled:
                    settled.wait_for(lambda: len(outcomes) >= 3, timeout=60)
                    outcomes.append("held")
                    settled.notify_all()
        except claims.SweepBusy:
            with settled:
                outcomes.append("refused")
                settled.notify_all()

    threads = [threading.Thread(target=driver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]
    assert _live_leases(store, sweep) == []
