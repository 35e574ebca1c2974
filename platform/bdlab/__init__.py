"""bdlab: the platform that drives `trials` (CLI now; sweeps, scheduling, tracking to come)."""

__version__ = "0.1.0"
