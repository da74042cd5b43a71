"""The instrument registry: every module of this package that defines an :class:`Instrument` registers it.

Adding a statistic is one module here (its class declares name, table, columns, options, taps, in-graph
compute and host-side tables) plus a figure in :mod:`ablations.report.figures` and an entry in the test
harness (``tests/test_instruments.py``). Modules are found by listing the package, so nothing else changes.

Importing this package does not import TensorFlow (instrument modules use the lazy ``tf`` of
:mod:`ablations.instruments.base`), so the config layer validates ``capture:`` with it.

``capture:`` keeps its four switches as aliases of instruments (every shipped config uses them):
``params`` (``param_norms``), ``updates`` (``param_norms.updates``), ``activations`` (the block instruments)
and ``histograms`` (``grad_hist``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ablations.instruments.base import SHARED_TABLES, Column, Instrument, Options  # noqa: F401 - re-exported
from zoo.registry import Registry

_NOT_INSTRUMENTS = {"base", "kernels"}  # and private modules (leading underscore)
# The block instruments that `capture.activations: false` switches off.
BLOCK_INSTRUMENTS = ("preact_grad", "activation", "residual", "gate", "block_scalars")

_REGISTRY: Registry[type[Instrument]] | None = None


def registry() -> Registry[type[Instrument]]:
    """All instrument classes by name (imports the package's modules once; no TensorFlow)."""
    global _REGISTRY
    if _REGISTRY is None:
        reg: Registry[type[Instrument]] = Registry("instrument")
        for mod in pkgutil.iter_modules(__path__):
            if mod.name in _NOT_INSTRUMENTS or mod.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{mod.name}")
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Instrument) and obj.name and \
                        obj.__module__ == module.__name__:
                    reg.register(obj.name, obj)
        _REGISTRY = reg
    return _REGISTRY


def classes() -> list[type[Instrument]]:
    """Every instrument class, in column order."""
    reg = registry()
    return sorted((reg.get(n) for n in reg.names()), key=lambda c: (c.order, c.name))


def names() -> list[str]:
    return registry().names()


def get(name: str) -> type[Instrument]:
    """The instrument ``name``; an unknown name lists the known ones with the closest match."""
    return registry().get(name)


def parse_options(name: str, value: Any) -> Options | None:
    """Validated options of one ``capture.instruments`` entry (``true``/``false``/a mapping of options).

    Returns None when the entry switches the instrument off. Raises ``ValueError`` (from pydantic or the
    registry) naming what is wrong.
    """
    cls = get(name)
    if value is False or value is None:
        return None
    if value is True:
        return cls.Opts()
    if not isinstance(value, dict):
        raise ValueError(f"capture.instruments.{name} must be true, false or a mapping of options, got {value!r}")
    value = dict(value)
    if value.pop("enabled", True) is False:
        return None
    return cls.Opts(**value)


def _aliases(cap: dict[str, Any]) -> dict[str, Any]:
    """``capture.params/updates/activations/histograms`` as instrument entries."""
    out: dict[str, Any] = {"param_norms": {"updates": bool(cap.get("updates", True))} if cap.get("params", True)
                           else False,
                           "grad_hist": bool(cap.get("histograms", False))}
    out.update({name: bool(cap.get("activations", True)) for name in BLOCK_INSTRUMENTS})
    return out


def resolve(capture: Any) -> list[tuple[type[Instrument], Options]]:
    """The enabled instruments of a ``capture`` section (a :class:`~ablations.config.CaptureConfig`, a dict
    of the same keys, or None for the defaults), in column order, with their options.

    An entry under ``capture.instruments`` wins over the alias switches (its options merged over theirs).
    """
    cap = capture.model_dump() if hasattr(capture, "model_dump") else dict(capture or {})
    explicit = dict(cap.get("instruments") or {})
    aliases = _aliases(cap)
    out = []
    for cls in classes():
        value = aliases.get(cls.name, cls.default)
        if cls.name in explicit:
            mine = explicit[cls.name]
            value = {**value, **mine} if isinstance(value, dict) and isinstance(mine, dict) else mine
        opts = parse_options(cls.name, value)
        if opts is not None:
            out.append((cls, opts))
    return out


def table_columns(table: str, enabled: list[type[Instrument]] | None = None) -> list[str]:
    """The columns of a shared table in stored order: every standard instrument's (NaN when off) plus the
    enabled opt-in ones, then the derived columns."""
    chosen = [c for c in classes() if c.table == table and (c.default or (enabled and c in enabled))]
    cols = [col.name for c in chosen for col in c.columns]
    cols += [col.name for c in classes() if c.default or (enabled and c in enabled)
             for t, col in c.derived if t == table]
    return cols


def tables() -> list[str]:
    """Every table an instrument writes (shared tables first), for the report's loader."""
    own = [t for c in classes() for t in (c.table, *(name for name, _ in c.more_tables)) if t not in SHARED_TABLES]
    return [*SHARED_TABLES, *dict.fromkeys(own)]
