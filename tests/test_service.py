"""`bdlab server`: the real tracking service on this machine: its own PostgreSQL (initdb + pg_ctl),
MLflow with basic authentication and proxied artifacts; start is idempotent, data survive a stop,
and every misuse is one line before anything starts."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ADMIN_PASSWORD = "admin-password-for-tests"
SECRETS = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-for-tests",
    "BDLAB_DB_PASSWORD": "db-password-for-tests",
}

pytestmark = pytest.mark.skipif(
    shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
    reason="PostgreSQL server programs are not installed (.ci/run installs them)",
)


def bdlab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bdlab.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **SECRETS, **(env or {})},
        timeout=300,
    )


def call(url: str, path: str, auth: str | None = None, data: dict | None = None) -> int:
    request = urllib.request.Request(url + path, data=json.dumps(data).encode() if data else None)
    if data:
        request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def request_json(url: str, path: str, auth: str) -> dict:
    request = urllib.request.Request(url + path)
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def start_service(root: Path, port: int, *options: str) -> subprocess.CompletedProcess:
    """`bdlab server start` under `root` (made reachable for PostgreSQL's own user when we are root)."""
    if os.getuid() == 0:  # PostgreSQL runs as `postgres`, which must reach the folder
        for parent in [root, *root.parents]:
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    started = bdlab("server", "start", "--root", str(root), "--port", str(port), *options)
    assert started.returncode == 0, started.stderr
    return started


def add_user(root: Path, name: str, role: str, password: str, *options: str) -> subprocess.CompletedProcess:
    """`bdlab server user add`, its password in BDLAB_USER_PASSWORD."""
    return bdlab(
        "server",
        "user",
        "add",
        name,
        "--role",
        role,
        *options,
        "--root",
        str(root),
        env={"BDLAB_USER_PASSWORD": password},
    )


@pytest.fixture(scope="module")
def service_root(tmp_path_factory):
    from bdlab.servers import free_port

    root = tmp_path_factory.mktemp("service")
    port = free_port()
    started = start_service(root, port)
    yield root, f"http://127.0.0.1:{port}", started.stdout
    bdlab("server", "stop", "--root", str(root))


def test_start_prints_the_uris_and_the_server_authenticates(service_root):
    root, url, printed = service_root
    assert f"MLFLOW_TRACKING_URI={url}" in printed
    assert "--optuna-storage postgresql+psycopg://bdlab:$BDLAB_DB_PASSWORD@127.0.0.1:" in printed
    search = "/api/2.0/mlflow/experiments/search?max_results=5"
    assert call(url, search) == 401  # anonymous
    assert call(url, search, f"admin:{ADMIN_PASSWORD}") == 200
    assert call(url, search, "admin:wrong-password") == 401
    # nothing secret is written where the service keeps its state, but the auth configuration
    state = json.loads((root / "service.json").read_text())
    assert SECRETS["BDLAB_DB_PASSWORD"] not in json.dumps(state)
    assert oct((root / "auth.ini").stat().st_mode & 0o777) == "0o600"
    # nor on the server's command line, which every local user can read (ps)
    pid = state["pid"]
    assert SECRETS["BDLAB_DB_PASSWORD"] not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
        errors="replace"
    )


def test_start_again_is_idempotent_and_data_survive_a_stop(service_root):
    root, url, _ = service_root
    admin = f"admin:{ADMIN_PASSWORD}"
    assert call(url, "/api/2.0/mlflow/experiments/create", admin, {"name": "survives"}) == 200
    pid = json.loads((root / "service.json").read_text())["pid"]
    again = bdlab("server", "start", "--root", str(root), "--port", url.rsplit(":", 1)[1])
    assert again.returncode == 0 and json.loads((root / "service.json").read_text())["pid"] == pid
    stopped = bdlab("server", "stop", "--root", str(root))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    status = bdlab("server", "status", "--root", str(root))
    assert status.returncode == 1 and ": stopped" in status.stdout
    restarted = bdlab("server", "start", "--root", str(root), "--port", url.rsplit(":", 1)[1])
    assert restarted.returncode == 0, restarted.stderr
    assert call(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=survives", admin) == 200


def test_a_reader_browses_and_cannot_write_a_writer_writes(service_root):
    root, url, _ = service_root
    users = {"ann": ("reader", "ann-password-12345"), "bob": ("writer", "bob-password-12345")}
    for name, (role, password) in users.items():
        added = add_user(root, name, role, password)
        assert added.returncode == 0, added.stderr
    search = "/api/2.0/mlflow/experiments/search?max_results=5"
    bob, ann = "bob:bob-password-12345", "ann:ann-password-12345"
    assert call(url, "/api/2.0/mlflow/experiments/create", bob, {"name": "team-sweep"}) == 200
    experiment = request_json(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=team-sweep", ann)
    team = experiment["experiment"]["experiment_id"]
    assert call(url, search, ann) == 200  # a reader browses the team's experiments
    # ... and cannot write into them (MLflow lets every login create experiments of its own)
    assert call(url, "/api/2.0/mlflow/runs/create", ann, {"experiment_id": team}) == 403
    assert call(url, "/api/2.0/mlflow/runs/create", bob, {"experiment_id": team}) == 200
    # a writer writes into experiments other members created (the shared attacked-model cache)
    assert (
        call(url, "/api/2.0/mlflow/experiments/create", f"admin:{ADMIN_PASSWORD}", {"name": "shared"}) == 200
    )
    shared = request_json(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=shared", bob)
    assert (
        call(
            url, "/api/2.0/mlflow/runs/create", bob, {"experiment_id": shared["experiment"]["experiment_id"]}
        )
        == 200
    )
    assert call(url, search, "ann:wrong-password-123") == 401
    again = add_user(root, "ann", "reader", "x" * 12)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    # ... unless asked to update it (the head's start commands re-add the workers' login)
    updated = add_user(root, "ann", "writer", "ann-new-password-1", "--exist-ok")
    assert updated.returncode == 0, updated.stderr
    assert call(url, "/api/2.0/mlflow/runs/create", "ann:ann-new-password-1", {"experiment_id": team}) == 200
    short = add_user(root, "cid", "reader", "short")
    assert (
        short.stderr.strip()
        == "bdlab: error: BDLAB_USER_PASSWORD: not set or shorter than 12 characters (MLflow refuses it)"
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {"BDLAB_DB_PASSWORD": ""}, "bdlab: error: environment: BDLAB_DB_PASSWORD not set"),
        (
            [],
            {"MLFLOW_AUTH_ADMIN_PASSWORD": "short"},
            "bdlab: error: MLFLOW_AUTH_ADMIN_PASSWORD: shorter than 12",
        ),
        (
            ["--postgres-url", "postgresql://bdlab:secret@10.0.0.1:5432"],
            {},
            "bdlab: error: --postgres-url: a password in the URL is not allowed",
        ),
        (["--workers", "0"], {}, "bdlab: error: --workers: 0 is not allowed; an integer from 1 to 16"),
    ],
)
def test_misuse_is_one_line_before_anything_starts(tmp_path, args, env, expected):
    done = bdlab("server", "start", "--root", str(tmp_path / "svc"), *args, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(expected) and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "svc" / "postgres").exists()


def test_status_of_an_empty_folder_is_one_line(tmp_path):
    done = bdlab("server", "status", "--root", str(tmp_path))
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"bdlab: error: --root: {str(tmp_path.resolve())!r} holds no tracking service (no service.json)"
    )
