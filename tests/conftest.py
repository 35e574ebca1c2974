from __future__ import annotations

import pytest
import torch

# One intra-op thread: on these 2-core machines, 2 threads beside any other process made small
# models 10-100x slower (DHBE smoke run: 27 s with 2 threads, 0.2 s with 1, under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from trials.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_digits():
    """A few dozen digits images: enough for smoke tests of every component."""
    from trials.data import load_dataset

    return load_dataset("digits", {"train_subset": 40, "test_subset": 40})


@pytest.fixture(scope="session")
def tiny_attacked(tmp_path_factory):
    """A BadNets mini_resnet on tiny digits, trained one epoch and saved as an attacked-model folder."""
    from trials.run import AttackSpec, load_attacked, run_attack, save_attack_result

    spec = AttackSpec(
        attack_params={"ratio": 0.2},
        dataset_params={"train_subset": 60, "test_subset": 40},
        epochs=1,
        device="cpu",
    )
    folder = save_attack_result(run_attack(spec), tmp_path_factory.mktemp("attacked") / "badnets")
    return load_attacked(folder, "cpu")


@pytest.fixture(scope="session")
def digits_badnets(tmp_path_factory):
    """The defenses' quality problem: BadNets 3x3 (target 0, 10 %) on digits with mini_resnet,
    trained with the digits recipe and saved as an attacked-model folder (ASR >= 0.95)."""
    from trials.run import AttackSpec, load_attacked, run_attack, save_attack_result

    spec = AttackSpec(attack_params={"size": 3, "target": 0, "ratio": 0.1}, device="cpu")
    folder = save_attack_result(run_attack(spec), tmp_path_factory.mktemp("quality") / "badnets")
    attacked = load_attacked(folder, "cpu")
    assert attacked.metrics["asr"] >= 0.95
    return attacked


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
