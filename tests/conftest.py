from __future__ import annotations

import pytest
import torch

# One intra-op thread: on these 2-core machines, 2 threads beside any other process made small
# models 10-100x slower (DHBE smoke run: 27 s with 2 threads, 0.2 s with 1, under load).
torch.set_num_threads(1)

# the contracts' tiny digits problem (tiny_digits, tiny_attacked), shared with plugin authors' tests
pytest_plugins = ["trials.testing.fixtures"]


@pytest.fixture(scope="session")
def digits():
    from trials.data import load_dataset

    return load_dataset("digits")


QUALITY_RUNS = pytest.StashKey[list]()


def pytest_collection_modifyitems(config, items):
    """The quality tests run last, and the runs they need start first: each quality module lists its
    runs in QUALITY_RUNS, and `_start_quality_runs` hands them all to the pool (tests/quality.py) as
    the session begins, so they train on the second core while the other tests run. Their order
    among themselves is kept."""
    quality = [item for item in items if item.get_closest_marker("quality")]
    items[:] = [item for item in items if not item.get_closest_marker("quality")] + quality
    modules = dict.fromkeys(item.module for item in quality)
    config.stash[QUALITY_RUNS] = [run for module in modules for run in getattr(module, "QUALITY_RUNS", [])]


@pytest.fixture(scope="session", autouse=True)
def _start_quality_runs(request):
    runs = request.config.stash.get(QUALITY_RUNS, [])
    if runs:
        request.getfixturevalue("quality_runs").prefetch(runs)


@pytest.fixture(scope="session")
def quality_runs(tmp_path_factory):
    """The quality runs of the session (tests/quality.py): each (case, seed) once, in a pool of two
    worker processes; BadNets 3x3 (target 0, 10 %) on digits with mini_resnet and the digits recipe
    is the defenses' attacked model at each seed (seed 0 with its clean reference model)."""
    from quality import Runs

    runs = Runs(tmp_path_factory.mktemp("quality"))
    yield runs
    runs.close()


@pytest.fixture(scope="session")
def digits_badnets(quality_runs):
    """The defenses' quality problem at seed 0, loaded in this process."""
    return quality_runs.attacked(0)


# --- bdlab tracking (tests/test_tracking.py): a real MLflow server, and a local SQLite store --------


@pytest.fixture(scope="session")
def mlflow_server_uri(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts), for the session."""
    from bdlab.servers import mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", timeout_s=180) as url:
        yield url


@pytest.fixture(scope="session")
def local_store(tmp_path_factory):
    """The local store (SQLite + file artifacts) in a temporary results folder."""
    from bdlab.tracking import Store

    results = tmp_path_factory.mktemp("local-store") / "results"
    return Store.open(results, tracking_uri=f"sqlite:///{results / 'mlflow.db'}")


@pytest.fixture(scope="session")
def server_store(tmp_path_factory, mlflow_server_uri):
    """A store that tracks to the session's MLflow server (Optuna DB in a temporary folder)."""
    from bdlab.tracking import Store

    return Store.open(tmp_path_factory.mktemp("server-store") / "results", tracking_uri=mlflow_server_uri)


# --- a tiny study sweep's results folder (tests/test_reporting.py, tests/test_notebooks.py) ---------


@pytest.fixture(scope="session")
def study_sweep(tmp_path_factory):
    """The results folder of a tiny study sweep `tiny-report`, run once a session (tests/test_reporting.py
    and tests/test_notebooks.py read it): BadNets on 400 digits images (8 epochs: a real backdoored model), FT with 2 configurations x
    2 defense seeds x 2 held-out subsets = 8 trials; SQLite tracking under the results folder. Ray is
    shut down once the sweep is done: the store is all the readers need, and a module that starts its
    own Ray (tests/test_sweep.py) must not find one running."""
    import os

    import ray
    import yaml
    from bdlab.sweep import run_sweep

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    try:
        root = tmp_path_factory.mktemp("report-sweep")
        spec = {
            "name": "tiny-report",
            "datasets": [{"name": "digits", "params": {"train_subset": 400, "test_subset": 200}}],
            "models": ["mini_resnet"],
            "attacks": [{"name": "badnets", "params": {"ratio": 0.2}}],
            "seeds": [0],
            "attack_training": {"epochs": 8},
            "objectives": {"acc": "max", "asr": "min"},
            "defenses": [
                {
                    "name": "ft",
                    "preset": "smoke",
                    "space": {"lr": {"float": [0.001, 0.05], "log": True}},
                    "study": {"configurations": 2, "seeds": [0, 1], "budgets": [0.02], "subsets": 2},
                }
            ],
            "resources": {"attack": {"cpu": 1, "gpu": 0}, "defense": {"cpu": 0.5, "gpu": 0.25}},
            "device": "cpu",
        }
        path = root / "tiny-report.yaml"
        path.write_text(yaml.safe_dump(spec))
        results = root / "results"
        run_sweep(path, results=results, address=ray.get_runtime_context().gcs_address, out=lambda _: None)
    finally:
        ray.shutdown()
    return results
