"""Where a sweep's results go: the tracking store, the Optuna storage beside it, the results folder.

- the local store (default): `results/mlflow.db` (SQLite), artifacts under `results/mlartifacts`,
  Optuna studies in `results/optuna.db`;
- a tracking server (`http(s)://...`, e.g. the cluster head): artifacts go through the server's proxy
  (`mlflow-artifacts:`), so workers on other nodes need no shared file system.

A `Store` is plain data (picklable): the driver sends it to Ray workers as it is, and each process
opens its own `Tracker` with `store.tracker()`. Nothing here sets MLflow's global state
(`mlflow.set_tracking_uri`, `set_experiment`, an active run): `set_experiment` leaks
`MLFLOW_EXPERIMENT_ID` into the environment, and the driver's global URI never reaches Ray workers
anyway. Workers get the URI (and credentials) from `Store.env()`.

The SQLite schema is created once by `Store.open` in the driver, under a file lock: a fresh SQLite DB
opened by many processes at once fails in MLflow's Alembic migrations.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bdlab.tracking.base import Tracker
from trials.errors import BdlabError, InvalidValue

# credentials and TLS settings a worker needs to reach the same server as the driver
ENV_PASSED_TO_WORKERS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_INIT_LOCK = ".bdlab-store.lock"


@dataclass(frozen=True)
class Store:
    """Where results are tracked."""

    results: Path  # results folder (absolute)
    tracking_uri: str  # http(s)://... or sqlite:////abs/results/mlflow.db
    optuna_url: str  # SQLAlchemy URL; default sqlite:////abs/results/optuna.db
    artifact_root: str | None  # the local store: file:///abs/results/mlartifacts; a server: None

    @classmethod
    def open(
        cls,
        results: str | Path = "results",
        tracking_uri: str | None = None,
        optuna_url: str | None = None,
    ) -> Store:
        """Open (and on first use create) a store. The tracking URI is `tracking_uri`, else
        `MLFLOW_TRACKING_URI`, else a SQLite DB in `results`. Databases are initialized here, once,
        so trial processes never race their schema migrations."""
        results = Path(results).expanduser().resolve()
        results.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results / 'mlflow.db'}"
        uri = _check_tracking_uri(uri, "tracking_uri" if tracking_uri else "MLFLOW_TRACKING_URI")
        optuna_url = optuna_url or f"sqlite:///{results / 'optuna.db'}"
        remote = uri.startswith(("http://", "https://"))
        artifact_root = None if remote else (results / "mlartifacts").as_uri()
        store = cls(results, uri, optuna_url, artifact_root)
        from filelock import FileLock  # a dependency of torch and ray

        if remote:  # a wrong login is one line now, not a failed trial later
            store.tracker().check_access()
        with FileLock(str(results / _INIT_LOCK), timeout=600):
            if not remote:
                store.tracker().experiment_names()  # creates the schema, from this one process
            _init_optuna_db(optuna_url)
        return store

    @property
    def is_remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def is_loopback(self) -> bool:
        """A server on this machine's loopback interface (unreachable from other nodes)."""
        return self.is_remote and urlsplit(self.tracking_uri).hostname in LOOPBACK_HOSTS

    def at_host(self, host: str) -> Store:
        """The same store, its server named by `host` (the address other nodes reach it at)."""
        parts = urlsplit(self.tracking_uri)
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        return dataclasses.replace(self, tracking_uri=urlunsplit(parts._replace(netloc=netloc)))

    def tracker(self) -> Tracker:
        """This process's handle on the tracking store."""
        from bdlab.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker(self.tracking_uri, self.artifact_root)

    def env(self) -> dict[str, str]:
        """Environment variables a Ray worker needs to reach this store (the runtime_env's env_vars)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        env.update({k: os.environ[k] for k in ENV_PASSED_TO_WORKERS if os.environ.get(k)})
        return env

    def as_config(self) -> dict[str, str | None]:
        """JSON-able fields (for a trial's config); `Store(**...)` after `from_config` rebuilds it."""
        return {
            "results": str(self.results),
            "tracking_uri": self.tracking_uri,
            "optuna_url": self.optuna_url,
            "artifact_root": self.artifact_root,
        }

    @classmethod
    def from_config(cls, config: dict[str, str | None]) -> Store:
        return cls(
            Path(str(config["results"])),
            str(config["tracking_uri"]),
            str(config["optuna_url"]),
            config["artifact_root"],
        )


def _check_tracking_uri(uri: str, field: str) -> str:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https", "databricks") or scheme in _DB_SCHEMES:
        return uri
    raise InvalidValue(
        field,
        uri,
        "use an http(s):// tracking server, or a database URL such as sqlite:////abs/path/mlflow.db "
        "(MLflow 3.13+ refuses file stores: local folders and file:// URIs)",
    )


def _init_optuna_db(url: str) -> None:
    import optuna

    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - any failure to open the URL is a bad optuna_url
        raise BdlabError(
            f"optuna_url: {hide_password(url)!r} cannot be opened ({type(err).__name__}: {err})"
        ) from None
    storage.engine.dispose()


def hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
