"""`bdlab server start | stop | status`: the team's tracking service on one host.

One PostgreSQL (its own, initialized under ROOT/postgres, or one given by URL) holds three
databases: MLflow's tracking store, MLflow's users and permissions, and the Optuna studies. An
`mlflow server` with basic authentication serves the tracking API and proxies artifacts into
ROOT/artifacts, so workers need neither database credentials nor a shared filesystem.

Secrets come from the environment only, never from arguments or files you write:
MLFLOW_AUTH_ADMIN_PASSWORD (the admin user's password, set on the first start),
MLFLOW_FLASK_SERVER_SECRET_KEY (the same on every start) and BDLAB_DB_PASSWORD (the database
password). What the service needs again (ports, addresses, the auth configuration) lives under ROOT,
readable by its owner only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bdlab.postgres import DATABASES, MAX_CONNECTIONS, LocalPostgres, default_user, import_driver
from bdlab.servers import WILDCARD_HOSTS, connect_host, free_port, server_command, server_env
from bdlab.tracking.store import LOOPBACK_HOSTS
from trials.errors import BdlabError

REQUIRED_ENV = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "BDLAB_DB_PASSWORD")
ADMIN = "admin"
# connections PostgreSQL keeps for everything but the MLflow server (Optuna's drivers, psql)
RESERVED_CONNECTIONS = 20


class ServiceError(BdlabError):
    """The tracking service could not be started, stopped or reached."""


@dataclass
class ServiceState:
    """What `start` recorded under ROOT (service.json): no secret is in it."""

    host: str
    port: int
    workers: int
    postgres: str  # the database server, without user or password: host:port
    managed_postgres: bool
    pid: int | None = None

    @property
    def tracking_uri(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}"

    def optuna_url(self, with_password: bool = False) -> str:
        password = os.environ.get("BDLAB_DB_PASSWORD", "") if with_password else "$BDLAB_DB_PASSWORD"
        return f"postgresql+psycopg://bdlab:{password}@{self.postgres}/optuna"


def pool_settings(workers: int, max_connections: int = MAX_CONNECTIONS) -> dict[str, str]:
    """MLflow's SQLAlchemy pool per server worker, so that every worker's two engines (tracking
    and auth stores) at their fullest stay under PostgreSQL's max_connections, less a reserve."""
    per_engine = max(2, (max_connections - RESERVED_CONNECTIONS) // (2 * workers))
    pool = max(1, per_engine // 2)
    return {
        "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(pool),
        "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(per_engine - pool),
        "MLFLOW_SQLALCHEMYSTORE_POOL_RECYCLE": "1800",
    }


def _secrets() -> dict[str, str]:
    missing = [k for k in REQUIRED_ENV if not os.environ.get(k)]
    if missing:
        raise ServiceError(
            f"environment: {', '.join(missing)} not set; the service reads its secrets from the "
            "environment only (e.g. `set -a; . ~/.bdlab/cluster.env; set +a`)"
        )
    if len(os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]) < 12:
        raise ServiceError(
            "MLFLOW_AUTH_ADMIN_PASSWORD: shorter than 12 characters is not allowed (MLflow refuses it)"
        )
    return {k: os.environ[k] for k in REQUIRED_ENV}


def _state_file(root: Path) -> Path:
    return root / "service.json"


def read_state(root: str | Path) -> ServiceState | None:
    path = _state_file(Path(root))
    if not path.exists():
        return None
    return ServiceState(**json.loads(path.read_text()))


def _existing_state(root: Path) -> ServiceState:
    state = read_state(root)
    if state is None:
        raise ServiceError(f"--root: {str(root)!r} holds no tracking service (no service.json)")
    return state


def _save_state(root: Path, state: ServiceState) -> None:
    _write_private(_state_file(root), json.dumps(asdict(state), indent=2))


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _external_postgres(url: str) -> str:
    """host:port of a PostgreSQL URL given without a password (the password is BDLAB_DB_PASSWORD)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgresql+psycopg") or not parts.hostname:
        raise ServiceError(f"--postgres-url: {url!r} is not allowed; postgresql://USER@HOST:PORT")
    if parts.password:
        raise ServiceError(
            "--postgres-url: a password in the URL is not allowed; give it as BDLAB_DB_PASSWORD"
        )
    if parts.username not in (None, "bdlab"):
        raise ServiceError(
            f"--postgres-url: user {parts.username!r} is not allowed; the service's user is bdlab"
        )
    return f"{parts.hostname}:{parts.port or 5432}"


def _db_url(postgres: str, password: str, database: str) -> str:
    return urlunsplit(("postgresql+psycopg", f"bdlab:{password}@{postgres}", f"/{database}", "", ""))


def start(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    postgres_url: str | None = None,
    workers: int = 2,
    pg_user: str | None = None,
    timeout_s: float = 120,
) -> ServiceState:
    """Start the service, or leave a running one as it is (same root): idempotent."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    secrets = _secrets()
    state = read_state(root)
    if state is not None and _alive(state.pid) and healthy(state.tracking_uri):
        if state.managed_postgres:
            _local(root, state, pg_user).start()  # e.g. after a reboot of PostgreSQL alone
        return state
    import_driver()  # a missing driver is one line before anything starts
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:
        raise ServiceError(
            "MLflow's authentication needs Flask-WTF, which is not installed: pip install 'bdlab[cluster]'"
        )
    if postgres_url is None:
        pg_port = int(state.postgres.rsplit(":", 1)[1]) if state else free_port()
        pg = LocalPostgres(
            root / "postgres",
            host,
            pg_port,
            pg_user or default_user(),
        )
        pg.initialize(secrets["BDLAB_DB_PASSWORD"])
        pg.start()
        pg.create_databases(secrets["BDLAB_DB_PASSWORD"])
        postgres = f"{connect_host(pg.host)}:{pg.port}"
    else:
        postgres = _external_postgres(postgres_url)
        _create_databases(postgres, secrets["BDLAB_DB_PASSWORD"])
    state = ServiceState(host, port, workers, postgres, postgres_url is None)
    password = secrets["BDLAB_DB_PASSWORD"]
    auth_ini = root / "auth.ini"
    _write_private(
        auth_ini,
        "[mlflow]\n"
        "default_permission = READ\n"
        # a login's password hash (PBKDF2) is checked once per minute per server worker, not on
        # every request: ~30 requests per trial made each trial cost seconds of server CPU
        # (benchmarks/tracking.py); a changed password reaches the other workers within the minute
        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}\n"
        f"database_uri = {_db_url(postgres, password, 'mlflow_auth')}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    (root / "artifacts").mkdir(exist_ok=True)
    env = server_env()  # no tracking URI of ours, no MLflow job runner
    env.update(pool_settings(workers))
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
    env["MLFLOW_BACKEND_STORE_URI"] = _db_url(postgres, password, "mlflow")  # not on the command line
    if not env.get("MLFLOW_SERVER_ALLOWED_HOSTS"):
        env["MLFLOW_SERVER_ALLOWED_HOSTS"] = ",".join(allowed_hosts(host))
    # basic authentication, and artifacts proxied (MLflow 3's default, said explicitly)
    command = server_command(None, root / "artifacts", host, port, workers)
    command += ["--app-name", "basic-auth", "--serve-artifacts"]
    log = open(root / "mlflow.log", "ab")  # noqa: SIM115 (the server keeps it)
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log.close()
    state.pid = proc.pid
    _save_state(root, state)
    deadline = time.monotonic() + timeout_s
    while not healthy(state.tracking_uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc.pid)
            tail = (root / "mlflow.log").read_text(errors="replace")[-600:]
            raise ServiceError(
                f"mlflow server did not start ({' '.join(tail.split())}); log: {root / 'mlflow.log'}"
            )
        time.sleep(0.5)
    return state


AUTH_CACHE_S = 60


def allowed_hosts(host: str) -> list[str]:
    """The Host headers the server accepts: MLflow's default (loopback and the private ranges,
    against DNS rebinding) plus this machine's own names and addresses when it listens beyond
    loopback, which the workers use even where the address is not in a private range."""
    import socket

    from mlflow.server.security_utils import get_default_allowed_hosts

    hosts = list(get_default_allowed_hosts())
    if host not in LOOPBACK_HOSTS:
        import ray.util

        own = {socket.gethostname(), socket.getfqdn(), ray.util.get_node_ip_address()}
        if host not in WILDCARD_HOSTS:
            own.add(host)
        hosts += [name for address in sorted(own) for name in (address, f"{address}:*")]
    return hosts


def _create_databases(postgres: str, password: str) -> None:
    psycopg = import_driver()
    host, port = postgres.rsplit(":", 1)
    with psycopg.connect(
        host=host, port=int(port), user="bdlab", password=password, dbname="postgres", autocommit=True
    ) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def _local(root: Path, state: ServiceState, pg_user: str | None) -> LocalPostgres:
    host, port = state.postgres.rsplit(":", 1)
    return LocalPostgres(root / "postgres", host, int(port), pg_user or default_user())


def _terminate(pid: int | None, grace_s: float = 15) -> None:
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def stop(root: str | Path, pg_user: str | None = None) -> bool:
    """Stop the MLflow server and, if the service owns it, PostgreSQL. False when nothing ran."""
    root = Path(root).resolve()
    state = _existing_state(root)
    was_running = _alive(state.pid)
    _terminate(state.pid)
    if state.managed_postgres:
        pg = _local(root, state, pg_user)
        was_running = was_running or pg.running()
        pg.stop()
    state.pid = None
    _save_state(root, state)
    return was_running


def status(root: str | Path) -> tuple[ServiceState, bool]:
    root = Path(root).resolve()
    state = _existing_state(root)
    return state, _alive(state.pid) and healthy(state.tracking_uri)


ROLES = ("reader", "writer")


def add_user(root: str | Path, name: str, role: str, exist_ok: bool = False) -> None:
    """A team member's MLflow login, password from BDLAB_USER_PASSWORD. A reader browses every
    experiment (the service's default permission is READ) and cannot write into any it did not
    create (MLflow lets every login create experiments of its own). A writer is an MLflow admin,
    because sweeps write into experiments other members created (the shared attacked-model cache)
    and MLflow 3.17 has no group to grant EDIT to; admins can also manage logins. With `exist_ok`,
    an existing login gets this password and role (the head's start commands re-run on every
    `ray up`)."""
    if role not in ROLES:
        raise ServiceError(f"--role: {role!r} is not allowed; reader or writer")
    password = os.environ.get("BDLAB_USER_PASSWORD", "")
    if len(password) < 12:
        raise ServiceError("BDLAB_USER_PASSWORD: not set or shorter than 12 characters (MLflow refuses it)")
    admin_password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    if not admin_password:
        raise ServiceError("environment: MLFLOW_AUTH_ADMIN_PASSWORD not set (the admin adds users)")
    state, running = status(root)
    if not running:
        raise ServiceError(f"--root: the tracking service under {root} is not running (bdlab server start)")
    url = state.tracking_uri
    try:
        _admin_call(url, "/api/2.0/mlflow/users/create", {"username": name, "password": password}, admin_password)
    except ServiceError as err:
        if not (exist_ok and "RESOURCE_ALREADY_EXISTS" in str(err)):
            raise
        body = {"username": name, "password": password}
        _admin_call(url, "/api/2.0/mlflow/users/update-password", body, admin_password, method="PATCH")
    body = {"username": name, "is_admin": role == "writer"}
    _admin_call(url, "/api/2.0/mlflow/users/update-admin", body, admin_password, method="PATCH")


def _admin_call(url: str, path: str, body: dict, admin_password: str, method: str = "POST") -> None:
    import base64

    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method)
    request.add_header("Content-Type", "application/json")
    token = base64.b64encode(f"{ADMIN}:{admin_password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as err:
        detail = " ".join(err.read().decode(errors="replace").split())[:300]
        raise ServiceError(f"{url}{path}: HTTP {err.code} ({detail})") from None
