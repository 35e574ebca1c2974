"""Real servers on loopback: an MLflow tracking server for tests and for `bdlab ui`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bdlab.tracking import Store
from trials.errors import BdlabError

WILDCARD_HOSTS = ("0.0.0.0", "", "*", "::")


def connect_host(host: str) -> str:
    """The address a client on this machine connects to for a server listening on `host` (a
    wildcard listens on every interface, loopback included)."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """The server's environment: ours without a tracking URI (the server is the store), and without
    MLflow 3's job runner (a uvicorn-independent pool of ~8 huey worker processes for GenAI jobs the
    platform does not use) unless the caller asked for it."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def server_command(
    backend_uri: str | None, artifacts_dir: str | Path, host: str, port: int, workers: int = 1
) -> list[str]:
    """`mlflow server`'s command line; with `backend_uri` None the server reads it from
    MLFLOW_BACKEND_STORE_URI (a URI with a password stays out of the process list)."""
    store = ["--backend-store-uri", backend_uri] if backend_uri is not None else []
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *store,
        "--artifacts-destination",
        str(artifacts_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def _start(
    backend_uri: str,
    artifacts_dir: Path,
    host: str,
    port: int | None,
    workers: int,
    timeout_s: float,
    log_file,
) -> tuple[subprocess.Popen, str]:
    port = port or free_port(host)
    Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        server_command(backend_uri, artifacts_dir, host, port, workers),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        start_new_session=True,  # its own process group: uvicorn workers end with it
    )
    url = f"http://{connect_host(host)}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BdlabError(
                f"mlflow server exited with code {proc.returncode} before answering:\n{_tail(log_file)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    _stop(proc)
    raise BdlabError(
        f"mlflow server did not answer {url}/health within {timeout_s:.0f} s:\n{_tail(log_file)}"
    )


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def _tail(log_file, chars: int = 3000) -> str:
    try:
        log_file.flush()
        return Path(log_file.name).read_text(errors="replace")[-chars:]
    except (OSError, AttributeError):
        return "(no log)"


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    timeout_s: float = 120,
) -> Iterator[str]:
    """Run `mlflow server` (a free port if `port` is None) until the block ends; yields its URL once
    GET /health answers. Artifacts are proxied (`mlflow-artifacts:`) and stored in `artifacts_dir`."""
    artifacts_dir = Path(artifacts_dir)
    with tempfile.NamedTemporaryFile("w+", prefix="mlflow-server-", suffix=".log", delete=False) as log_file:
        try:
            proc, url = _start(backend_uri, artifacts_dir, host, port, workers, timeout_s, log_file)
            try:
                yield url
            finally:
                _stop(proc)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(log_file.name)


def serve_ui(store: Store, port: int = 5000) -> None:
    """`bdlab ui`: the MLflow UI over the store. A tracking server already has one: print its URL.
    The local store gets an MLflow server on 127.0.0.1 in the foreground until Ctrl-C."""
    if store.is_remote:
        print(f"MLflow UI: {store.tracking_uri}")
        return
    cmd = server_command(store.tracking_uri, store.results / "mlartifacts", "127.0.0.1", port)
    print(f"MLflow UI of {store.results}: http://127.0.0.1:{port}  (Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(proc)
