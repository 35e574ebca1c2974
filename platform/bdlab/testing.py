"""Contract tests of the tracking interface, for any backend (as `optuna.testing` ships its storage
tests): subclass `TrackerContract` in a test module and give it a `tracker` fixture.

    class TestMyTracker(TrackerContract):
        @pytest.fixture
        def tracker(self):
            return MyTracker(...)

bdlab runs it against MLflow's local SQLite store and a real `mlflow server` (tests/test_tracking.py).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from bdlab.tracking import Tracker, schema
from trials.errors import InvalidValue


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def small_folder(path: Path) -> Path:
    """A folder with a file and a sub-folder (an artifact upload's shape, not a model)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "spec.yaml").write_text("note: not a model\n")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "x.txt").write_text("x")
    return path


class TrackerContract:
    """What the platform relies on from a `Tracker`."""

    @pytest.fixture
    def tracker(self) -> Tracker:
        raise NotImplementedError("a subclass gives the tracker under test")

    def test_experiments_are_created_once_found_and_listed(self, tracker: Tracker) -> None:
        name = unique("bdlab/contract")
        assert tracker.find_experiment(name) is None
        exp = tracker.experiment_id(name)
        assert tracker.experiment_id(name) == exp and tracker.find_experiment(name) == exp
        assert name in tracker.experiment_names()

    def test_experiment_id_is_race_safe(self, tracker: Tracker) -> None:
        name = unique("bdlab/raced")
        ids: list[str] = []
        threads = [threading.Thread(target=lambda: ids.append(tracker.experiment_id(name))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(ids) == 4 and len(set(ids)) == 1

    def test_child_runs_params_metrics_status(self, tracker: Tracker) -> None:
        exp = tracker.experiment_id(unique("bdlab/runs"))
        parent = tracker.create_run(exp, "parent")
        marker = unique("trial")
        params = {"defense": "clp", "params": {"u": 3.0, "layers": [1, 2]}, "long": "x" * 7000, "empty": {}}
        child = tracker.create_run(exp, "clp #0", {schema.TRIAL: marker}, params, parent_run_id=parent)
        for epoch in range(3):
            tracker.log_metrics(
                child, {"acc": 0.5 + epoch / 10, "asr": None, "loss": float("nan"), "val": {"asr": 0.1}}, step=epoch
            )
        tracker.finish_run(child, "FAILED", tags={"bdlab.reason": "diverged"})

        run = tracker.get_run(child)
        assert run.tags[schema.PARENT] == parent and run.tags["bdlab.reason"] == "diverged"
        assert run.status == "FAILED" and run.name == "clp #0" and run.experiment_id == exp
        assert run.end_time is not None and run.end_time >= run.start_time > 0
        assert run.params["defense"] == "clp" and run.params["params.u"] == "3.0"
        assert run.params["params.layers"] == "[1,2]" and run.params["empty"] == "{}"
        assert len(run.params["long"]) == 6000 and run.params["long"].endswith("...")
        assert set(run.metrics) == {"acc", "val.asr"}  # None and NaN skipped
        history = tracker.metric_history(child, "acc")
        assert [(step, round(value, 6)) for step, value in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]

        assert tracker.find_runs([exp], {schema.TRIAL: marker}) == []  # default: FINISHED only
        found = tracker.find_runs(None, {schema.TRIAL: marker}, statuses=("FAILED", "FINISHED"))
        assert [r.run_id for r in found] == [child]
        newer = tracker.create_run(exp, "clp #1", {schema.TRIAL: marker}, parent_run_id=parent)
        tracker.finish_run(newer)
        assert [r.run_id for r in tracker.find_runs([exp], {schema.TRIAL: marker}, None)] == [newer, child]
        assert tracker.find_runs([exp], {schema.TRIAL: marker, "bdlab.reason": "nope"}, None) == []
        with pytest.raises(InvalidValue, match="status"):
            tracker.finish_run(newer, "DONE")
        with pytest.raises(InvalidValue, match="statuses"):
            tracker.find_runs([exp], {}, statuses=("DONE",))

    def test_tags_status_and_deletion(self, tracker: Tracker) -> None:
        exp = tracker.experiment_id(unique("bdlab/tags"))
        run = tracker.create_run(exp, "r", {"a": "1", "b": ["x", 2]})
        assert tracker.get_run(run).status == "RUNNING" and tracker.get_run(run).end_time is None
        tracker.set_tags(run, {"a": "2", "c": 3})
        tracker.delete_tag(run, "b")
        tags = tracker.get_run(run).tags
        assert tags["a"] == "2" and tags["c"] == "3" and "b" not in tags
        tracker.finish_run(run, "KILLED")
        assert tracker.get_run(run).status == "KILLED"
        tracker.set_status(run, "RUNNING")  # a retried trial's run is opened again
        assert tracker.get_run(run).status == "RUNNING"
        tracker.delete_run(run)
        assert tracker.find_runs([exp], {"a": "2"}, statuses=None) == []
        assert [r.run_id for r in tracker.find_runs([exp], {"a": "2"}, statuses=None, deleted=True)] == [run]

    def test_a_tag_value_with_quotes_is_found(self, tracker: Tracker) -> None:
        exp = tracker.experiment_id(unique("bdlab/quotes"))
        run = tracker.create_run(exp, "r", {"bdlab.cell": "it's a cell"})
        assert [r.run_id for r in tracker.find_runs([exp], {"bdlab.cell": "it's a cell"}, None)] == [run]

    def test_artifacts_up_listed_and_down(self, tracker: Tracker, tmp_path: Path) -> None:
        exp = tracker.experiment_id(unique("bdlab/folders"))
        run = tracker.create_run(exp, "artifacts")
        tracker.log_folder(run, small_folder(tmp_path / "src"), "things")
        (tmp_path / "one.txt").write_text("1")
        tracker.log_artifact(run, tmp_path / "one.txt")
        tracker.log_artifact(run, tmp_path / "one.txt", "plots")
        assert set(tracker.list_artifacts(run)) == {"things", "one.txt", "plots"}
        assert set(tracker.list_artifacts(run, "things")) == {"things/spec.yaml", "things/sub"}
        got = tracker.download_folder(run, "things", tmp_path / "dest")
        assert got == tmp_path / "dest" / "things"
        assert (got / "spec.yaml").read_text() == "note: not a model\n"
        assert (got / "sub" / "x.txt").read_text() == "x"
