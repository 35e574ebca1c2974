"""The tracking store: MLflow for runs, metrics and artifacts, plus the Optuna storage beside it.

One `Store` names where a sweep's results go:
- the local store (default): `results/mlflow.db` (SQLite), artifacts under `results/mlartifacts`,
  Optuna studies in `results/optuna.db`;
- a tracking server (`http(s)://...`, e.g. the cluster head): artifacts go through the server's proxy
  (`mlflow-artifacts:`), so workers on other nodes need no shared file system.

Everything here uses `MlflowClient` with an explicit tracking URI and explicit run ids: nothing sets
MLflow's global state (`mlflow.set_tracking_uri`, `mlflow.set_experiment` or an active run), because
`set_experiment` leaks `MLFLOW_EXPERIMENT_ID` into the environment, and the driver's global URI never
reaches Ray workers anyway (platform-notes 3.1). Workers get the URI from `Store.env()`.

The SQLite schema is created once by `Store.open` in the driver, under a file lock: a fresh SQLite DB
opened by many processes at once fails in MLflow's Alembic migrations (platform-notes 3.6).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trials.errors import BdlabError, InvalidValue

if TYPE_CHECKING:  # mlflow takes seconds to import; modules that only name a Store need not pay it
    import mlflow
    import mlflow.entities

# tags the platform sets on its runs
KIND_TAG = "bdlab.kind"  # "sweep" (a sweep's parent run), "attack", "defense", ...
SWEEP_TAG = "bdlab.sweep"
GENERATION_TAG = "bdlab.generation"
PARENT_TAG = "mlflow.parentRunId"

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
ENV_PASSED_TO_WORKERS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_INIT_LOCK = ".bdlab-store.lock"


@dataclass
class Store:
    """Where results are tracked. Plain data (picklable): send it to Ray workers as it is."""

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

        with FileLock(str(results / _INIT_LOCK), timeout=600):
            if not remote:
                _init_tracking_db(uri)
            _init_optuna_db(optuna_url)
        return store

    @property
    def is_remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def client(self) -> mlflow.MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created if missing (safe when several processes race)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        client = self.client()
        for _ in range(5):
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":  # deleted in the UI: bring it back, runs need it active
                    client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = f"{self.artifact_root}/{_slug(name)}" if self.artifact_root else None
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
            time.sleep(0.1)  # another process created it between our get and create: read it
        raise BdlabError(f"experiment {name!r}: could neither find nor create it in {self.tracking_uri}")

    def env(self) -> dict[str, str]:
        """Environment variables a Ray worker needs to reach this store (the runtime_env's env_vars)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        env.update({k: os.environ[k] for k in ENV_PASSED_TO_WORKERS if os.environ.get(k)})
        return env


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


def _init_tracking_db(uri: str) -> None:
    """Create the tracking DB's schema from this one process (migrations race otherwise)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _init_optuna_db(url: str) -> None:
    import optuna

    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - any failure to open the URL is a bad optuna_url
        raise BdlabError(
            f"optuna_url: {_hide_password(url)!r} cannot be opened ({type(err).__name__}: {err})"
        ) from None
    storage.engine.dispose()


def _hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _slug(name: str) -> str:
    """A folder name for an experiment's artifacts: `bdlab/sweep 1` -> `bdlab/sweep_1`."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_" for p in name.split("/")]
    return "/".join(parts)


# --- runs --------------------------------------------------------------------------------------------


def sweep_experiment_name(sweep: str) -> str:
    return f"bdlab/{sweep}"


def parent_run(
    store: Store,
    experiment_id: str,
    sweep: str,
    *,
    fresh: bool = False,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """The id of the sweep's parent run: the newest generation is reused (a re-run resumes it);
    `fresh=True` starts generation N+1. Tag `bdlab.generation` names the generation."""
    existing = find_runs(store, [experiment_id], {KIND_TAG: "sweep", SWEEP_TAG: sweep}, statuses=None)
    generations = [(_int(r.data.tags.get(GENERATION_TAG)), r.info.run_id) for r in existing]
    newest = max(generations, default=(0, None))
    if newest[1] is not None and not fresh:
        if tags:
            _log_batch(store, newest[1], tags={str(k): v for k, v in tags.items()})
        return newest[1]
    generation = newest[0] + 1
    run = store.client().create_run(
        experiment_id,
        tags=_tag_values(
            {**(tags or {}), KIND_TAG: "sweep", SWEEP_TAG: sweep, GENERATION_TAG: str(generation)}
        ),
        run_name=sweep if generation == 1 else f"{sweep} (generation {generation})",
    )
    return run.info.run_id


def start_child_run(
    store: Store,
    experiment_id: str,
    parent_run_id: str,
    name: str,
    tags: Mapping[str, Any],
    params: Mapping[str, Any],
) -> str:
    """A run nested under `parent_run_id`, with `params` flattened to "a.b" keys. Client API only: it
    works from any process and touches no active-run state."""
    run = store.client().create_run(
        experiment_id, tags=_tag_values({**tags, PARENT_TAG: parent_run_id}), run_name=name
    )
    _log_batch(store, run.info.run_id, params=flatten(params))
    return run.info.run_id


def log_metrics(
    store: Store,
    run_id: str,
    metrics: Mapping[str, Any],
    step: int | None = None,
    tags: Mapping[str, Any] | None = None,
) -> None:
    """Log metrics (and `tags`) in one batch (nested dicts become "a.b" keys); None, non-finite and
    non-numeric values are skipped."""
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_METRICS_PER_BATCH

    now = int(time.time() * 1000)
    items = []
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            items.append(Metric(key, float(value), now, int(step or 0)))
    from mlflow.entities import RunTag

    run_tags = [RunTag(k, v) for k, v in _tag_values(tags or {}).items()]
    client = store.client()
    for i in range(0, max(len(items), 1), MAX_METRICS_PER_BATCH):
        batch = items[i : i + MAX_METRICS_PER_BATCH]
        if batch or run_tags:
            client.log_batch(run_id, metrics=batch, tags=run_tags if i == 0 else [])


def set_tags(store: Store, run_id: str, tags: Mapping[str, Any]) -> None:
    _log_batch(store, run_id, tags=dict(tags))


def finish_run(
    store: Store,
    run_id: str,
    status: str = "FINISHED",
    tags: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """End a run with `status` (FINISHED, FAILED or KILLED), after logging the final `metrics` and
    `tags` (one batch: a trial's end costs two calls to the store)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise InvalidValue("status", status, "one of FINISHED, FAILED, KILLED")
    if metrics:
        log_metrics(store, run_id, metrics, tags=tags)
    elif tags:
        _log_batch(store, run_id, tags=dict(tags))
    store.client().set_terminated(run_id, status)


def find_runs(
    store: Store,
    experiment_ids: list[str] | None,
    tags: Mapping[str, str],
    statuses: Iterable[str] | None = ("FINISHED",),
) -> list[mlflow.entities.Run]:
    """Active (not deleted) runs whose tags equal `tags` exactly, newest first. `experiment_ids=None`
    searches every experiment; `statuses=None` accepts every status."""
    from mlflow.entities import ViewType

    client = store.client()
    if experiment_ids is None:
        experiment_ids = _all_experiment_ids(client)
    if not experiment_ids:
        return []
    clauses = [f"tags.`{_check_key(k)}` = {_quote(v)}" for k, v in tags.items()]
    if statuses is not None:
        statuses = list(statuses)
        bad = [s for s in statuses if s not in RUN_STATUSES]
        if bad:
            raise InvalidValue("statuses", bad, f"run statuses are {', '.join(RUN_STATUSES)}")
        if len(statuses) == 1:  # MLflow's filter has no IN for status: several are filtered here
            clauses.append(f"attributes.status = {_quote(statuses[0])}")
    runs: list[mlflow.entities.Run] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=" and ".join(clauses),
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time DESC", "attributes.run_id DESC"],
            page_token=token,
        )
        runs.extend(r for r in page if statuses is None or r.info.status in statuses)
        token = page.token
        if not token:
            return runs


def log_folder(store: Store, run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Upload the files of `folder` (recursively) as the run's artifact folder `artifact_path`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BdlabError(f"log_folder: {str(folder)!r} is not a folder")
    store.client().log_artifacts(run_id, str(folder), artifact_path)


def download_folder(store: Store, run_id: str, artifact_path: str, dest: str | Path) -> Path:
    """Download the run's artifact folder `artifact_path` into `dest`; returns dest/artifact_path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return Path(store.client().download_artifacts(run_id, artifact_path, str(dest)))


# --- helpers -----------------------------------------------------------------------------------------


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict stays as "{}"."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _value_str(value: Any, limit: int) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | Mapping):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return {str(k): _value_str(v, MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def _log_batch(
    store: Store, run_id: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
) -> None:
    from mlflow.entities import Param, RunTag
    from mlflow.utils.validation import (
        MAX_ENTITY_KEY_LENGTH,
        MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH,
    )

    entries: list[Param | RunTag] = [
        Param(str(k)[:MAX_ENTITY_KEY_LENGTH], _value_str(v, MAX_PARAM_VAL_LENGTH))
        for k, v in (params or {}).items()
    ]
    entries += [RunTag(k, v) for k, v in _tag_values(tags or {}).items()]
    client = store.client()
    for i in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
        chunk = entries[i : i + MAX_PARAMS_TAGS_PER_BATCH]
        client.log_batch(
            run_id,
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
        )


def _all_experiment_ids(client: mlflow.MlflowClient) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _check_key(key: str) -> str:
    if "`" in key:
        raise InvalidValue("tag", key, "tag names may not contain backticks")
    return key


def _quote(value: Any) -> str:
    """A string literal of MLflow's filter language, which has no escapes: 'x' or "x"."""
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise InvalidValue("tag value", text, "a searched tag value may hold ' or \" but not both")


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0
