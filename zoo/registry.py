"""Name registries that fail loudly.

One :class:`Registry` per kind of thing (models, activations, initializers, datasets, ...), in the style of
timm's ``@register`` + ``build(name)``: an unknown name raises :class:`UnknownNameError` listing the known
names and the closest match, so a typo in a YAML file is a one-line fix rather than a stack trace.

This module imports nothing heavy (no TensorFlow), so the config layer can use it.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown name was looked up in a registry.

    Attributes:
        kind: what was looked up ("model", "activation", ...).
        name: the name that was not found.
        known: the sorted known names.
        suggestion: the closest known name, or ``None``.
    """

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = difflib.get_close_matches(str(name), self.known, n=1, cutoff=0.5)
        self.suggestion = close[0] if close else None
        hint = f" Did you mean '{self.suggestion}'?" if self.suggestion else ""
        super().__init__(f"unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def suggest(name: str, known: list[str]) -> str:
    """Returns ' Did you mean 'x'?' for the closest of ``known`` to ``name``, or ''."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A mapping from names to objects (usually factories) with loud lookups.

    Args:
        kind: singular noun used in error messages, e.g. ``"model"``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """Registers ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            self._meta[name] = dict(meta)
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """Returns the object registered under ``name`` or raises :class:`UnknownNameError`."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, name, list(self._items)) from None

    def meta(self, name: str) -> dict[str, Any]:
        """Returns the metadata given at registration (paper, family, ...)."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        """Returns the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
