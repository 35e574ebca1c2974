"""The tracking interface: every read and write of experiments, runs, tags, metrics and artifacts that
the platform makes goes through a `Tracker`, so a new backend (or retries, authentication, node tags)
changes one module. `bdlab.tracking.mlflow_tracker` implements it for MLflow (a local SQLite store or
a tracking server); `bdlab.testing.TrackerContract` is the contract a backend passes.

Runs are returned as `RunRecord`s, plain data that does not depend on the backend's classes.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
END_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass(frozen=True)
class RunRecord:
    """One run as the backend holds it: times in epoch milliseconds (`end_time` None while it runs),
    tags and params as strings, metrics at their latest value."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    end_time: int | None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Tracker(abc.ABC):
    """Runs, tags, metrics and artifacts in one tracking store (`uri` names it in messages)."""

    uri: str

    # -- experiments ------------------------------------------------------------------------------
    @abc.abstractmethod
    def experiment_id(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        """The id of experiment `name`, created if missing (also when several processes race), and
        restored if it was deleted. `tags` are set on it when it lacks them."""

    @abc.abstractmethod
    def check_access(self) -> None:
        """Raise a one-line `BdlabError` when the store refuses this process (a server's login);
        called once by the driver before any work starts."""

    @abc.abstractmethod
    def find_experiment(self, name: str) -> str | None:
        """The id of experiment `name`, or None; nothing is created."""

    @abc.abstractmethod
    def experiment_names(self) -> list[str]:
        """The names of every active experiment."""

    # -- runs -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """A new RUNNING run; `params` nested dicts become "a.b" keys; values longer than the
        backend's limit are cut with "..."; returns its id."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRecord: ...

    @abc.abstractmethod
    def find_runs(
        self,
        experiment_ids: list[str] | None,
        tags: Mapping[str, str],
        statuses: Iterable[str] | None = ("FINISHED",),
        deleted: bool = False,
    ) -> list[RunRecord]:
        """Active (not deleted) runs whose tags equal `tags` exactly, newest first (start time, then
        run id). `experiment_ids=None` searches every experiment; `statuses=None` accepts any;
        `deleted=True` lists the deleted runs instead."""

    @abc.abstractmethod
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def delete_tag(self, run_id: str, key: str) -> None: ...

    @abc.abstractmethod
    def log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, Any],
        step: int | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Metrics (nested dicts become "a.b" keys) and `tags` in one call; None, booleans,
        non-finite and non-numeric values are skipped."""

    @abc.abstractmethod
    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Every logged (step, value) of one metric, by step."""

    @abc.abstractmethod
    def set_status(self, run_id: str, status: str) -> None:
        """Mark a run RUNNING again (a retried trial) or end it (FINISHED, FAILED or KILLED)."""

    def finish_run(
        self,
        run_id: str,
        status: str = "FINISHED",
        tags: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """End a run with `status` after its final `metrics` and `tags` (one call to the store)."""
        from trials.errors import InvalidValue

        if status not in END_STATUSES:
            raise InvalidValue("status", status, f"one of {', '.join(END_STATUSES)}")
        if metrics or tags:
            self.log_metrics(run_id, metrics or {}, tags=tags)
        self.set_status(run_id, status)

    @abc.abstractmethod
    def delete_run(self, run_id: str) -> None:
        """Delete a run: searches no longer list it."""

    # -- artifacts --------------------------------------------------------------------------------
    @abc.abstractmethod
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file into the run's artifacts (under `artifact_path`)."""

    @abc.abstractmethod
    def log_folder(self, run_id: str, folder: str | Path, artifact_path: str) -> None:
        """Upload the files of `folder` (recursively) as the run's artifact folder `artifact_path`."""

    @abc.abstractmethod
    def list_artifacts(self, run_id: str, artifact_path: str | None = None) -> list[str]:
        """The paths of the run's artifacts directly under `artifact_path` (folders included)."""

    @abc.abstractmethod
    def download_folder(self, run_id: str, artifact_path: str, dest: str | Path) -> Path:
        """Download the run's artifact folder `artifact_path` into `dest`; returns dest/artifact_path."""

    @abc.abstractmethod
    def artifact_location(self, experiment_id: str) -> str:
        """Where the experiment's artifacts are stored (a file:// URI, or mlflow-artifacts: behind a
        server's proxy)."""


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
