"""The report's figure registry: every module of this package draws one figure and registers it.

Adding a figure is one module here: a function that returns a :class:`~ablations.report.plotting.Plot`
(``None`` when the run lacks its data), decorated with ``@figure(key=..., section=..., scope=..., order=...,
needs=("table:column", ...))``. ``needs`` names the stored columns it reads (``"a:x | b:y"``: either will do);
a run or arm without them skips the figure before it is called. The report writes ``<key>.png`` and
``<key>.csv``; the run page groups figures by ``section`` in ``order``.

Run-level figures (``scope="run"``, on the report's front page) are ``fn(run: RunData, plan: Plan)``: they
read ``run``'s tables (:data:`ablations.report.data.TABLES`, every instrument's table plus Keras' ``epochs``)
and map arms to colours and facets with ``plan`` (:func:`~ablations.report.plotting.facet_lines` and
``band`` aggregate the seeds). Per-arm figures (``scope="arm"``, on each arm's page) are ``fn(arm:
ArmView)``, one arm's rows only. Modules are found by listing the package (private ``_`` modules aside),
so nothing else changes. A figure that raises does not stop the report: the error is shown on the page
instead of the figure (and the tests fail on it).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import traceback
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
import seaborn as sns

from ablations.report.plotting import PALETTE, Figure, Plot, save

Scope = Literal["run", "arm"]
SCOPES = ("run", "arm")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One registered figure: what :func:`figure` was given, and the drawing function."""

    key: str  # file names <key>.png / <key>.csv, unique within the scope
    section: str  # the heading it appears under on the run page
    scope: Scope
    order: int  # position on its page (ascending)
    needs: tuple[str, ...]  # "table:column" (or "table"), alternatives joined by "|"; all entries required
    fn: Callable[..., Plot | None]

    def requirements(self) -> list[list[tuple[str, str | None]]]:
        """``needs`` parsed: for each entry, its alternatives as ``(table, column or None)``."""
        return [[_pair(alt) for alt in entry.split("|")] for entry in self.needs]


_SPECS: dict[tuple[str, str], Spec] = {}
_DISCOVERED = False


def _pair(text: str) -> tuple[str, str | None]:
    table, _, column = text.strip().partition(":")
    return table.strip(), column.strip() or None


def figure(*, key: str, section: str, scope: Scope = "run", order: int,
           needs: tuple[str, ...] = ()) -> Callable[[Callable[..., Plot | None]], Callable[..., Plot | None]]:
    """Registers the decorated function as figure ``key`` (see the module docstring); returns it unchanged.

    Raises:
        ValueError: an unknown scope, a malformed ``needs`` entry or a key already registered in the scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"figure {key!r}: scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(needs, str) or any(not t for entry in needs for t, _ in map(_pair, entry.split("|"))):
        raise ValueError(f"figure {key!r}: needs must be a tuple of 'table:column' strings, got {needs!r}")

    def register(fn: Callable[..., Plot | None]) -> Callable[..., Plot | None]:
        old = _SPECS.get((scope, key))
        if old is not None and old.fn.__module__ != fn.__module__:
            raise ValueError(f"{scope} figure {key!r} is registered twice: {old.fn.__module__} and {fn.__module__}")
        _SPECS[(scope, key)] = Spec(key, section, scope, order, tuple(needs), fn)
        return fn

    return register


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{__name__}.{mod.name}")
        _DISCOVERED = True


def specs(scope: Scope) -> list[Spec]:
    """Every registered figure of ``scope``, in page order."""
    _discover()
    return sorted((s for (sc, _), s in _SPECS.items() if sc == scope), key=lambda s: (s.order, s.key))


def get(scope: Scope, key: str) -> Spec:
    """The figure ``key`` of ``scope`` (a KeyError names the known ones)."""
    _discover()
    try:
        return _SPECS[(scope, key)]
    except KeyError:
        raise KeyError(f"no {scope} figure {key!r}; known: {', '.join(s.key for s in specs(scope))}") from None


def has_data(spec: Spec, table: Callable[[str], pd.DataFrame]) -> bool:
    """Whether every ``needs`` entry has a column with at least one value in ``table(name)``."""
    def present(name: str, column: str | None) -> bool:
        df = table(name)
        return not df.empty and (column is None or (column in df.columns and bool(df[column].notna().any())))

    return all(any(present(t, c) for t, c in alternatives) for alternatives in spec.requirements())


def draw(spec: Spec, args: tuple[Any, ...], table: Callable[[str], pd.DataFrame], out: Path,
         problems: list[str]) -> Figure | None:
    """Draws ``spec`` with ``args`` (``(run, plan)`` or ``(arm,)``) and writes it into ``out``.

    Returns None when ``table`` (the run's or the arm's tables) lacks what the figure needs or the figure
    returns None; a figure that raises is reported in ``problems`` instead (one broken figure must not cost
    the whole report).
    """
    if not has_data(spec, table):
        return None
    try:
        plot = spec.fn(*args)
        if plot is None:
            return None
        return save(plot.fig, out, spec.key, plot.data, plot.title, plot.caption, section=spec.section,
                    margin_right=plot.margin_right if spec.scope == "arm" else None)
    except Exception as err:
        problems.append(f"figure {spec.key} failed: {type(err).__name__}: {err}")
        traceback.print_exc()
        return None


def theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
