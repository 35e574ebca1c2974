"""The `Tracker` for MLflow: a local SQLite store or a tracking server, through `MlflowClient` with an
explicit tracking URI and explicit run ids (no global state: no `set_tracking_uri`, `set_experiment`
or active run). The only module of the platform that imports MLflow's client API.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdlab.tracking import schema
from bdlab.tracking.base import RUN_STATUSES, RunRecord, Tracker, flatten
from trials.errors import BdlabError, InvalidValue

if TYPE_CHECKING:  # mlflow takes seconds to import; modules that only name a Tracker need not pay it
    import mlflow
    import mlflow.entities


class MlflowTracker(Tracker):
    def __init__(self, tracking_uri: str, artifact_root: str | None = None) -> None:
        """`artifact_root` (a file:// URI) places new experiments' artifacts under it, one folder per
        experiment; None leaves it to the server (its artifact proxy)."""
        self.uri = tracking_uri
        self.artifact_root = artifact_root
        self._client: mlflow.MlflowClient | None = None

    @property
    def client(self) -> mlflow.MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- experiments ------------------------------------------------------------------------------
    def experiment_id(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        tags = dict(tags or {})
        for _ in range(5):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":  # deleted in the UI: bring it back, runs need it active
                    self.client.restore_experiment(exp.experiment_id)
                self._add_tags(exp, tags)
                return exp.experiment_id
            location = f"{self.artifact_root}/{_slug(name)}" if self.artifact_root else None
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=tags)
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
            time.sleep(0.1)  # another process created it between our get and create: read it
        raise BdlabError(f"experiment {name!r}: could neither find nor create it in {self.uri}")

    def _add_tags(self, exp: mlflow.entities.Experiment, tags: Mapping[str, str]) -> None:
        """Tags an experiment made before they existed lacks; a login that may not write there
        (a reader) leaves it as it is, and so does a process that another one beat to the write."""
        from mlflow.exceptions import MlflowException

        for key, value in tags.items():
            if exp.tags.get(key) != value:
                try:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
                except MlflowException as err:
                    if err.error_code == "PERMISSION_DENIED":
                        return
                    if self.client.get_experiment(exp.experiment_id).tags.get(key) != value:
                        raise

    def check_access(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.search_experiments(max_results=1)
        except MlflowException as err:
            raise access_error(err, self.uri) or err from None

    def find_experiment(self, name: str) -> str | None:
        exp = self.client.get_experiment_by_name(name)
        return None if exp is None or exp.lifecycle_stage == "deleted" else exp.experiment_id

    def experiment_names(self) -> list[str]:
        return [e.name for e in self._experiments()]

    def artifact_location(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).artifact_location

    def _experiments(self) -> list[mlflow.entities.Experiment]:
        found, token = [], None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    # -- runs -------------------------------------------------------------------------------------
    def create_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        all_tags = dict(tags or {})
        if parent_run_id is not None:
            all_tags[schema.PARENT] = parent_run_id
        run = self.client.create_run(experiment_id, tags=_tag_values(all_tags), run_name=name)
        if params:
            self._log_batch(run.info.run_id, params=flatten(params))
        return run.info.run_id

    def get_run(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def find_runs(
        self,
        experiment_ids: list[str] | None,
        tags: Mapping[str, str],
        statuses: Iterable[str] | None = ("FINISHED",),
        deleted: bool = False,
    ) -> list[RunRecord]:
        from mlflow.entities import ViewType

        if experiment_ids is None:
            experiment_ids = [e.experiment_id for e in self._experiments()]
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
        runs: list[RunRecord] = []
        token = None
        while True:
            page = self.client.search_runs(
                experiment_ids,
                filter_string=" and ".join(clauses),
                run_view_type=ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY,
                max_results=1000,
                order_by=["attributes.start_time DESC", "attributes.run_id DESC"],
                page_token=token,
            )
            runs.extend(_record(r) for r in page if statuses is None or r.info.status in statuses)
            token = page.token
            if not token:
                return runs

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._log_batch(run_id, tags=dict(tags))

    def delete_tag(self, run_id: str, key: str) -> None:
        self.client.delete_tag(run_id, key)

    def log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, Any],
        step: int | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, int(step or 0))
            for key, value in flatten(metrics).items()
            if not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        ]
        run_tags = [RunTag(k, v) for k, v in _tag_values(tags or {}).items()]
        for i in range(0, max(len(items), 1), MAX_METRICS_PER_BATCH):
            batch = items[i : i + MAX_METRICS_PER_BATCH]
            if batch or run_tags:
                self.client.log_batch(run_id, metrics=batch, tags=run_tags if i == 0 else [])

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def set_status(self, run_id: str, status: str) -> None:
        if status not in RUN_STATUSES:
            raise InvalidValue("status", status, f"one of {', '.join(RUN_STATUSES)}")
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status)

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    # -- artifacts --------------------------------------------------------------------------------
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_folder(self, run_id: str, folder: str | Path, artifact_path: str) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise BdlabError(f"log_folder: {str(folder)!r} is not a folder")
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def list_artifacts(self, run_id: str, artifact_path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(run_id, artifact_path)]

    def download_folder(self, run_id: str, artifact_path: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dest)))

    # -- helpers ----------------------------------------------------------------------------------
    def _log_batch(
        self, run_id: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
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
        for i in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = entries[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(
                run_id,
                params=[e for e in chunk if isinstance(e, Param)],
                tags=[e for e in chunk if isinstance(e, RunTag)],
            )


def access_error(err: BaseException, uri: str | None = None) -> BdlabError | None:
    """The one-line error for a tracking server's refusal (HTTP 401: no or a wrong login; 403: the
    login may not write there); None for any other error."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return None
    server = uri or _server_of(str(err))
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if err.error_code == "UNAUTHENTICATED":
        if not user:
            return BdlabError(
                f"tracking server {server}: needs a login; set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (HTTP 401)"
            )
        return BdlabError(
            f"tracking server {server}: refused the login of {user!r} (HTTP 401: wrong "
            "MLFLOW_TRACKING_USERNAME or MLFLOW_TRACKING_PASSWORD)"
        )
    if err.error_code == "PERMISSION_DENIED":
        return BdlabError(
            f"tracking server {server}: {user or 'this login'!r} may not write there (HTTP 403: a "
            "reader's account; ask the service's admin for a writer's: bdlab server user add NAME --role writer)"
        )
    return None


def _server_of(message: str) -> str:
    found = re.search(r"https?://[^/\s']+", message)
    return found.group(0) if found else os.environ.get("MLFLOW_TRACKING_URI", "(unknown)")


def _record(run: mlflow.entities.Run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        name=info.run_name or "",
        status=info.status,
        start_time=int(info.start_time or 0),
        end_time=int(info.end_time) if info.end_time else None,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
    )


def _slug(name: str) -> str:
    """A folder name for an experiment's artifacts: `bdlab/sweep 1` -> `bdlab/sweep_1`."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_" for p in name.split("/")]
    return "/".join(parts)


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


# MLflow's console output that a sweep replaces with its own progress lines; set in the driver by
# the command line and in every Ray worker (bdlab.worker.worker_env).
QUIET_MLFLOW_ENV = {
    # MLflow's usage telemetry: nothing leaves the machine, and its client unsets an environment
    # variable from several threads (a KeyError in a concurrent log_batch, seen in
    # benchmarks/tracking.py with 8 writers)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
