"""The model registry: every architecture (trials/models/<name>.py registers itself with @register_model)."""

from __future__ import annotations

from trials.registry import Registry

MODELS: Registry = Registry("model")
register_model = MODELS.register
