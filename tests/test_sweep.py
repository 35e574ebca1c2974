"""`bdlab sweep` end to end with the real components, started here: a local Ray cluster (2 CPUs and
one declared, fake GPU), MLflow (a real `mlflow server` on 127.0.0.1 with SQLite, or the local
SQLite store), Optuna's SQLite storage. Nothing is mocked.

The tiny sweep: BadNets and Blended on 60 digits images (one epoch), times CLP and fine-tuning,
three trials each, every trial asking 0.5 CPU and 0.25 GPU.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

pytestmark = pytest.mark.sweep

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def tiny_spec(name: str, defenses: list | None = None, attacks: list | None = None) -> dict:
    return {
        "name": name,
        "datasets": [{"name": "digits", "params": {"train_subset": 60, "test_subset": 40}}],
        "models": ["mini_resnet"],
        "attacks": attacks
        or [{"name": "badnets", "params": {"ratio": 0.2}}, {"name": "blended", "params": {"ratio": 0.2}}],
        "seeds": [0],
        "attack_training": {"epochs": 1},
        "plugins": ["sweep_plugins"],
        "defenses": defenses
        or [
            {"name": "clp", "trials": 3},
            {
                "name": "ft",
                "preset": "smoke",
                "trials": 3,
                "space": {"lr": {"float": [0.001, 0.05], "log": True}},
            },
        ],
        "resources": {"attack": {"cpu": 1, "gpu": 0}, "defense": {"cpu": 0.5, "gpu": 0.25}},
        "failure": {"max_retries": 1},
        "device": "cpu",
    }


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray: 2 CPUs, one declared GPU (logical: trials asking 0.25 run four at a time)."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).strip(
        os.pathsep
    )
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ["PYTHONPATH"]}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def plugin_registry():
    """`faulty` (and the plugin's metric) are registered in this process while a sweep loads them;
    the registries are restored after, so the contract tests never see them."""
    from trials.defenses import DEFENSES
    from trials.metrics import METRICS

    sys.path.insert(0, str(TESTS))
    with DEFENSES.scope(), METRICS.scope():
        yield
    sys.path.remove(str(TESTS))
    sys.modules.pop("sweep_plugins", None)


def attack_runs(store, key: str | None = None):
    from bdlab.tracking import schema

    tracker = store.tracker()
    tags = {schema.PHASE: "attack"} if key is None else {schema.CACHE_KEY: key}
    return tracker.find_runs([tracker.experiment_id(schema.ATTACK_EXPERIMENT)], tags, statuses=("FINISHED",))


def defense_runs(store, sweep: str, statuses=("FINISHED", "FAILED", "RUNNING", "KILLED")):
    from bdlab.tracking import schema

    tracker = store.tracker()
    exp = tracker.experiment_id(schema.sweep_experiment(sweep))
    return tracker.find_runs([exp], {schema.SWEEP: sweep, schema.PHASE: "defense"}, statuses=statuses)


def max_overlap(runs) -> int:
    events = sorted(
        [(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    now = best = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def test_tiny_sweep_records_everything_and_resumes_from_cache(
    ray_cluster, mlflow_server_uri, tmp_path, plugin_registry, capsys
):
    from bdlab.studies import DEFAULT_ATTR
    from bdlab.sweep import run_sweep
    from bdlab.tracking import Store

    spec_path = write_spec(tmp_path, tiny_spec("tiny"))
    results = tmp_path / "results"
    summary = run_sweep(spec_path, results=results, tracking_uri=mlflow_server_uri, address=ray_cluster)
    store = Store.open(results, mlflow_server_uri)
    tracker = store.tracker()

    # MLflow: one parent run, 12 child runs nested under it, with metrics, tags and artifacts
    children = defense_runs(store, "tiny")
    assert len(children) == 12
    parents = {r.tags["mlflow.parentRunId"] for r in children}
    assert len(parents) == 1
    parent = tracker.get_run(parents.pop())
    assert parent.tags["bdlab.kind"] == "sweep" and parent.tags["bdlab.sweep"] == "tiny"
    for r in children:
        assert r.status == "FINISHED"
        patch_only = ("asr_x4", "asr_x5", "asr_x9") if r.tags["bdlab.attack"] == "badnets" else ()
        for m in ("acc", "asr", "asr_cond", "ra", "seconds", "val_acc", "val_asr", *patch_only):
            assert m in r.metrics, m
        for t in (
            "bdlab.sweep",
            "bdlab.phase",
            "bdlab.dataset",
            "bdlab.model",
            "bdlab.attack",
            "bdlab.defense",
            "bdlab.cell",
            "bdlab.cache_key",
            "bdlab.study",
            "bdlab.status",
        ):
            assert r.tags.get(t), t
        assert r.tags["bdlab.status"] == "complete"
        files = set(tracker.list_artifacts(r.run_id, "defended"))
        assert {
            "defended/model.safetensors",
            "defended/spec.yaml",
            "defended/metrics.json",
            "defended/trigger.png",
        } <= files
    history = tracker.metric_history(children[0].run_id, "val_acc")
    assert len(history) >= 1  # step-wise
    parent_files = set(tracker.list_artifacts(parent.run_id))
    assert {"summary.md", "summary.json", "tiny.parquet"} <= parent_files
    assert len(tracker.list_artifacts(parent.run_id, "pareto")) == 4

    # the fake GPU: trials asking 0.25 shared it, never more than four at a time (how many actually
    # overlapped depends on how fast actors start on this machine: two at least, four at most)
    assert 2 <= max_overlap(children) <= 4

    # Optuna: one study per cell, 3 complete trials each, the default configuration first
    studies = optuna.get_all_study_summaries(store.optuna_url)
    assert len(studies) == 4
    for s in studies:
        study = optuna.load_study(study_name=s.study_name, storage=store.optuna_url)
        trials = study.get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE"] * 3
        assert trials[0].user_attrs.get(DEFAULT_ATTR) is True
        assert all(len(t.values) == 2 for t in trials)
    assert len(summary["cells"]) == 4 and all(c["default"] for c in summary["cells"])

    # a metric added through its one definition (tests/sweep_plugins.py) reaches every trial's run,
    # the Parquet table and the summary, with nothing else changed
    import pyarrow.parquet as pq

    assert all({"clean_errors", "val_clean_errors"} <= set(r.metrics) for r in children)
    table = pq.read_table(results / "tiny.parquet").to_pydict()
    assert len(table["clean_errors"]) == 12 and all(v is not None and v >= 0 for v in table["clean_errors"])
    assert all(v is not None for v in table["val_clean_errors"])
    assert all(c["default"]["report"]["clean_errors"] is not None for c in summary["cells"])
    # a defense-only metric (DER against the backdoored model) takes the same way
    assert all({"der", "val_der"} <= set(r.metrics) for r in children)
    assert all(0 <= v <= 1 for v in table["der"] + table["val_der"])

    # the attacked models: two trained, found again by cache key
    keys = {r.tags["bdlab.cache_key"] for r in children}
    assert len(keys) == 2 and all(len(attack_runs(store, k)) == 1 for k in keys)
    printed = capsys.readouterr().out
    # how busy the CPUs were, per phase and for the whole sweep (measured, so only bounded here)
    phase_busy = re.findall(r"\[(attack|defense)\] busy fraction ([0-9.]+): trials held", printed)
    assert [p for p, _ in phase_busy] == ["attack", "defense"]
    assert all(0 < float(f) <= 1.01 for _, f in phase_busy)
    assert 0 < summary["busy_fraction"] <= 1.01 and "; busy fraction " in printed

    # re-running: no attacked model trained, no trial repeated, the same summary (counted, not timed:
    # a wall-time bound would fail on a machine twice as slow)
    again = run_sweep(spec_path, results=results, tracking_uri=mlflow_server_uri, address=ray_cluster)
    rerun = capsys.readouterr().out
    assert "[attack] 2 of 2 attacked models cached" in rerun
    assert "[defense] 4 cells, 12 trials kept from earlier runs, 0 to run" in rerun
    assert len(defense_runs(store, "tiny")) == 12
    assert all(len(attack_runs(store, k)) == 1 for k in keys)
    assert again["cells"] == summary["cells"]
    table = lambda text: text[text.index("| cell |") : text.index("results table")]  # noqa: E731
    assert table(rerun) == table(printed)

    # --fresh: every defense trial again (a new generation), still no attacked model trained
    run_sweep(spec_path, results=results, tracking_uri=mlflow_server_uri, address=ray_cluster, fresh=True)
    runs = defense_runs(store, "tiny")
    assert len(runs) == 24
    assert {r.tags["bdlab.generation"] for r in runs} == {"1", "2"}
    assert all(len(attack_runs(store, k)) == 1 for k in keys)
    assert len(attack_runs(store)) == 2


def test_study_cell_runs_its_design_points_records_them_and_resumes(
    ray_cluster, mlflow_server_uri, tmp_path, plugin_registry, capsys
):
    """A study cell (docs/spec.md "Studies"): 2 configurations x 2 defense seeds x 1 budget x 2
    held-out subsets = 8 ordinary trials, tagged and tabled by their design point; a re-run runs none."""
    import pyarrow.parquet as pq
    from bdlab.studies import DEFAULT_ATTR, POINT_ATTR
    from bdlab.sweep import run_sweep
    from bdlab.tracking import Store

    defenses = [
        {
            "name": "ft",
            "preset": "smoke",
            "space": {"lr": {"float": [0.001, 0.05], "log": True}},
            "study": {"configurations": 2, "seeds": [0, 1], "budgets": [0.02], "subsets": 2},
        }
    ]
    spec = tiny_spec("tiny-study", defenses=defenses, attacks=[{"name": "badnets", "params": {"ratio": 0.2}}])
    spec_path = write_spec(tmp_path, spec)
    results = tmp_path / "results"
    run_sweep(spec_path, results=results, tracking_uri=mlflow_server_uri, address=ray_cluster)
    store = Store.open(results, mlflow_server_uri)

    children = defense_runs(store, "tiny-study")
    assert len(children) == 8 and all(r.status == "FINISHED" for r in children)
    points = {
        (r.tags["bdlab.configuration"], r.tags["bdlab.defense_seed"], r.tags["bdlab.data_subset"])
        for r in children
    }
    assert points == {(c, s, k) for c in "01" for s in "01" for k in "01"}
    assert {r.tags["bdlab.design"] for r in children} == {"sobol"}
    assert {r.tags["bdlab.data_fraction"] for r in children} == {"0.02"}
    assert {r.params["data_fraction"] for r in children} == {"0.02"}
    defaults = [r for r in children if r.tags["bdlab.default"] == "true"]
    assert {r.tags["bdlab.configuration"] for r in defaults} == {"0"} and len(defaults) == 4
    assert len({r.params["lr"] for r in children if r.tags["bdlab.configuration"] == "1"}) == 1

    table = pq.read_table(results / "tiny-study.parquet").to_pydict()
    assert sorted(
        zip(table["configuration"], table["defense_seed"], table["data_subset"], strict=True)
    ) == sorted((c, s, k) for c in (0, 1) for s in (0, 1) for k in (0, 1))
    assert set(table["data_fraction"]) == {0.02} and set(table["design"]) == {"sobol"}

    study = optuna.load_study(
        study_name=optuna.get_all_study_names(store.optuna_url)[0], storage=store.optuna_url
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 8
    assert all(POINT_ATTR in t.user_attrs for t in trials)
    assert [bool(t.user_attrs.get(DEFAULT_ATTR)) for t in trials] == [True] * 4 + [False] * 4
    capsys.readouterr()

    run_sweep(spec_path, results=results, tracking_uri=mlflow_server_uri, address=ray_cluster)
    rerun = capsys.readouterr().out
    assert "[defense] 1 cells, 8 trials kept from earlier runs, 0 to run" in rerun
    assert len(defense_runs(store, "tiny-study")) == 8


def test_failing_trials_are_recorded_and_the_sweep_goes_on(ray_cluster, tmp_path, plugin_registry, capsys):
    from bdlab.sweep import run_sweep
    from bdlab.tracking import Store

    spec = tiny_spec(
        "faults",
        attacks=[{"name": "badnets", "params": {"ratio": 0.2}}],
        defenses=[
            {"name": "clp", "trials": 2},
            # the default trial (mode ok) fails once, then its retry completes; the sampled ones
            # raise or return NaN weights every time
            {
                "name": "faulty",
                "trials": 3,
                # scale 0: the completed trial's classifier answers its bias alone (a collapsed model)
                "fixed": {"fail_once": str(tmp_path / "failed-once"), "scale": 0.0},
                "space": {"mode": {"choice": ["raise", "nan"]}},
            },
        ],
    )
    spec["attack_training"] = {"epochs": 15}  # above chance (1 epoch is not), so a collapse shows
    results = tmp_path / "results"
    summary = run_sweep(write_spec(tmp_path, spec), results=results, address=ray_cluster)
    store = Store.open(results)
    runs = defense_runs(store, "faults")
    assert len(runs) == 5  # a retried trial keeps its one run
    by_defense = {}
    for r in runs:
        by_defense.setdefault(r.tags["bdlab.defense"], []).append(r)
    assert all(r.status == "FINISHED" for r in by_defense["clp"])
    failed = [r for r in by_defense["faulty"] if r.status == "FAILED"]
    assert len(failed) == 2
    reasons = {r.tags["bdlab.failure"] for r in failed}
    assert all(
        "RuntimeError: faulty defense asked to fail" in x or "non-finite weights" in x for x in reasons
    )
    # the retried trial's run: complete, its first attempt's failure kept under another tag
    (retried,) = [r for r in by_defense["faulty"] if r.status == "FINISHED"]
    assert "bdlab.failure" not in retried.tags
    assert "fails its first attempt" in retried.tags["bdlab.earlier_failure"]
    assert (tmp_path / "failed-once").exists()
    cells = {c["cell"].split(" :: ")[1]: c for c in summary["cells"]}
    assert (cells["clp"]["complete"], cells["clp"]["failed"]) == (2, 0)
    assert (cells["faulty"]["complete"], cells["faulty"]["failed"]) == (1, 2)
    # the summary says the faulty defense collapsed the model instead of showing it as an erasure
    assert cells["faulty"]["default"]["collapsed"] and cells["faulty"]["default"]["report"]["acc"] <= 0.15
    assert not any(p["collapsed"] for p in cells["clp"]["points"])
    printed = capsys.readouterr().out
    assert "| 1/2 | none: all 1 trials collapsed, the method does not work on this problem |" in printed

    import pyarrow.parquet as pq

    table = pq.read_table(results / "faults.parquet").to_pylist()
    assert len(table) == 5
    assert sorted(r["status"] for r in table) == ["complete"] * 3 + ["failed"] * 2
    assert all(r["failure"] for r in table if r["status"] == "failed")
    assert not any(r["failure"] for r in table if r["status"] == "complete")


def _sweep_process(spec_path: Path, results: Path, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bdlab.cli",
            "sweep",
            str(spec_path),
            "--results",
            str(results),
            "--address",
            address,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def test_killed_sweep_resumes_with_every_trial_exactly_once(ray_cluster, tmp_path, plugin_registry):
    from bdlab.sweep import run_sweep
    from bdlab.tracking import Store

    spec = tiny_spec(
        "resume",
        attacks=[{"name": "badnets", "params": {"ratio": 0.2}}],
        defenses=[
            {
                "name": "ft",
                "preset": "smoke",
                "trials": 6,
                "space": {"lr": {"float": [0.001, 0.05], "log": True}},
            }
        ],
    )
    spec_path, results = write_spec(tmp_path, spec), tmp_path / "results"
    proc = _sweep_process(spec_path, results, ray_cluster, tmp_path / "first.log")
    optuna_db = results / "optuna.db"
    # no deadline of our own: the loop ends when two trials completed (or the driver exited, which the
    # assert below reports); CI's own limit catches a hang, and a slower machine just waits longer
    done = 0
    while proc.poll() is None:
        time.sleep(1)
        if optuna_db.exists():
            try:
                studies = optuna.get_all_study_summaries(f"sqlite:///{optuna_db}")
                done = sum(s.n_trials for s in studies)
                study = optuna.load_study(study_name=studies[0].study_name, storage=f"sqlite:///{optuna_db}")
                complete = sum(t.state.name == "COMPLETE" for t in study.get_trials())
            except Exception:
                continue
            if complete >= 2 and done >= 4:
                break
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep, trials in flight
    proc.wait()

    run_sweep(spec_path, results=results, address=ray_cluster)
    store = Store.open(results)
    study = optuna.load_study(
        study_name=optuna.get_all_study_summaries(store.optuna_url)[0].study_name, storage=store.optuna_url
    )
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in trials)
    runs = defense_runs(store, "resume")
    assert sorted(int(r.tags["bdlab.trial"]) for r in runs) == list(range(6))
    assert all(r.status == "FINISHED" for r in runs)


def test_two_sweeps_at_once_train_a_shared_attacked_model_once(ray_cluster, mlflow_server_uri, tmp_path):
    """Two drivers (processes) on one tracking server need the same attacked model at the same time."""
    from bdlab.tracking import Store

    procs = []
    for name in ("race_a", "race_b"):
        spec = tiny_spec(
            name,
            attacks=[{"name": "badnets", "params": {"ratio": 0.25}}],
            defenses=[{"name": "clp", "trials": 1}],
        )
        spec.pop("plugins")
        path = write_spec(tmp_path, spec)
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server_uri}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bdlab.cli",
                    "sweep",
                    str(path),
                    "--results",
                    str(tmp_path / name),
                    "--address",
                    ray_cluster,
                ],
                stdout=(tmp_path / f"{name}.log").open("w"),
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
    for p, name in zip(procs, ("race_a", "race_b"), strict=True):
        assert p.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    store = Store.open(tmp_path / "race_a", mlflow_server_uri)
    keys = {r.tags["bdlab.cache_key"] for n in ("race_a", "race_b") for r in defense_runs(store, n)}
    assert len(keys) == 1
    assert len(attack_runs(store, keys.pop())) == 1


def test_busy_fraction_is_trial_seconds_times_cpus_over_wall_times_cluster_cpus():
    from types import SimpleNamespace

    from bdlab.progress import PhaseProgress

    now = [0.0]
    progress = PhaseProgress("defense", 3, lambda t: t.trial_id, out=lambda line: None, clock=lambda: now[0])
    a, b, c = (SimpleNamespace(trial_id=i, last_result={}) for i in "abc")
    progress.on_trial_start(0, [], a)
    now[0] = 2.0
    progress.on_trial_start(0, [], b)
    now[0] = 6.0
    progress.on_trial_recover(0, [], b)  # b's first attempt: 4 s; its retry runs from here
    now[0] = 8.0
    progress.on_trial_complete(0, [], b)  # + 2 s
    progress.on_trial_start(0, [], c)
    now[0] = 10.0
    progress.on_trial_complete(0, [], a)  # 10 s
    progress.on_trial_error(0, [], c)  # 2 s: a failed trial held its CPUs too
    assert progress.trial_seconds == 18.0
    # two 1-CPU slots for 10 s: 18 of 20 CPU-seconds held; 2-CPU trials on a 4-CPU cluster: the same
    assert progress.busy_fraction(1, 2) == 0.9
    assert progress.busy_fraction(2, 4) == 0.9
    assert progress.busy_fraction(1, 4) == 0.45


def test_trials_that_fit_on_no_node_stop_the_sweep_with_one_line(ray_cluster, tmp_path, plugin_registry):
    """The module's Ray has 2 CPUs and one GPU: a 4-GPU attack trial could never start. On the Ray
    the sweep uses in this process (no address: no autoscaler to wait for) that is an error naming
    the field before anything is trained; on a joined cluster, a line saying what it waits for."""
    from bdlab.spec import TrialResources
    from bdlab.sweep import check_fits, run_sweep
    from bdlab.tracking import Store

    from trials.errors import InvalidValue

    spec = tiny_spec("unfit", attacks=[{"name": "badnets", "params": {"ratio": 0.2}}])
    spec["resources"]["attack"] = {"cpu": 1, "gpu": 4}
    results = tmp_path / "results"
    with pytest.raises(InvalidValue) as err:
        run_sweep(write_spec(tmp_path, spec), results=results, address=None, out=lambda _: None)
    assert str(err.value) == (
        "resources.attack: 'cpu 1, gpu 4' is not allowed; at most what one node of this Ray has "
        "(2 CPUs and 1 GPUs): no trial could start"
    )
    assert attack_runs(Store.open(results)) == []

    lines: list[str] = []
    check_fits(TrialResources(cpu=3), "defense", True, lines.append)
    check_fits(TrialResources(cpu=1, gpu=0.5), "defense", True, lines.append)  # fits: silent
    assert lines == [
        "[defense] waiting for a node with cpu 3, gpu 0: none of the 1 nodes has it now (largest: 2 CPUs "
        "and 1 GPUs); the autoscaler adds one if the cluster has such a node type, else stop and lower "
        "resources.defense"
    ]
