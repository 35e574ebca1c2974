"""Tracking: where results go (`Store`), the one interface every read and write of runs goes through
(`Tracker`, implemented for MLflow in `mlflow_tracker`), and the schema of experiments and tags
(`schema`).

    store = Store.open("results")            # or Store.open(..., tracking_uri="http://head:5000")
    tracker = store.tracker()
    run_id = tracker.create_run(tracker.experiment_id("bdlab/x"), "a run", tags={schema.SWEEP: "x"})
"""

from bdlab.tracking import schema
from bdlab.tracking.base import END_STATUSES, RUN_STATUSES, RunRecord, Tracker, flatten
from bdlab.tracking.store import Store

__all__ = ["END_STATUSES", "RUN_STATUSES", "RunRecord", "Store", "Tracker", "flatten", "schema"]
