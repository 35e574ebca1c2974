"""bdlab: the platform that drives `trials`: sweep specs, the Ray Tune phases, Optuna studies, tracking
in MLflow, reports, and the `bdlab` command line."""

__version__ = "0.1.0"
