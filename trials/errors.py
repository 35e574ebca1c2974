"""Errors that reach the user as one line: the field, the value, and what is allowed."""

from __future__ import annotations


class BdlabError(Exception):
    """An error caused by input; the CLI prints `str(err)` on one line and exits non-zero."""


class InvalidValue(BdlabError, ValueError):
    """A named field received a value outside what it allows."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: {value!r} is not allowed; {allowed}")


class UnsafeModelFile(BdlabError):
    """A model file that is not safetensors (pickles are never loaded)."""
