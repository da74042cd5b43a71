"""Lazily imported heavy modules: ``tf``, ``keras`` and ``pd`` (pandas) load on first attribute access.

Modules that declare things the TF-free layers read (instrument names, options, columns) but compute with
TensorFlow use these, so importing them costs nothing until a step is built.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _Lazy(types.ModuleType):
    """A module imported on first attribute access."""

    def __init__(self, target: str):
        super().__init__(target)
        self._target = target

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._target), attr)


tf: Any = _Lazy("tensorflow")
keras: Any = _Lazy("keras")
pd: Any = _Lazy("pandas")
