"""Name -> component registries, one per family (datasets, models, attacks, defenses, metrics).

A duplicate name is an error (as in torchvision), and looking up an unknown name raises an error
that lists the valid names. Components register with a decorator in their own file; the family's
`__init__` imports every file so that `import trials.attacks` fills the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from trials.errors import InvalidValue

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.name = name
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise InvalidValue(self.family, name, f"registered: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_registration_order(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def unregister(self, name: str) -> T:
        """Remove a component (a test's, or a plugin's being reloaded); returns it."""
        self.get(name)  # an unknown name is the usual one-line error
        return self._entries.pop(name)

    @contextlib.contextmanager
    def scope(self) -> Iterator[Registry[T]]:
        """Components registered inside the block are removed when it ends (and ones it removed come
        back): a test's own component never leaks into the next test."""
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries.clear()
            self._entries.update(saved)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]
