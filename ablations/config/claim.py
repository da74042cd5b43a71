"""The ``claim:`` section: a published result an experiment checks (``ablate reproduce``, configs/papers/).

Its expressions are parsed by :mod:`ablations.claims` (a small safe language over the stored tables, no
TensorFlow) and checked against the experiment's arms when the config is parsed (``loading._check_claim``), so
errors name file:line.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ablations.config.base import Strict
from zoo.registry import suggest


class ClaimPaper(Strict):
    """The paper a claim comes from."""

    authors: str = Field(min_length=1)
    year: int = Field(ge=1900, le=2100)
    title: str = Field(min_length=1)


class ClaimTolerance(Strict):
    """Where a claim's tolerance comes from (never widened to make a claim pass)."""

    # paper: the paper's own spread or stated range; seed_spread: the seed-to-seed spread measured here;
    # theory: an exact or mean-field prediction with its numerical error; bound: an inequality (no spread).
    source: Literal["paper", "seed_spread", "theory", "bound"]
    note: str = Field(min_length=1)  # the numbers behind it (e.g. "3 sd over seeds 0-4: 0.012")


class ClaimFigure(Strict):
    """The small figure drawn beside the claim's row, from the stored tables (PNG + CSV)."""

    kind: Literal["depth", "curve", "time", "values"] = "values"  # vs block depth | vs step/epoch | vs t | bars
    table: Optional[str] = None  # depth: blocks | kernels | params; curve: history | epochs; time: time_grads
    column: Optional[str] = None
    step: Union[int, Literal["first", "last"]] = "first"  # depth and time figures
    logy: bool = True
    relative: bool = False  # depth / time figures: divide by the value at the last block / step (as ratio() does)
    arms: Optional[str] = None  # arm selector of the arms drawn (default: all)
    ref: dict[str, Union[str, float]] = {}  # horizontal reference lines: label -> expression

    @model_validator(mode="after")
    def _table(self) -> "ClaimFigure":
        need = {"depth": ("blocks", "kernels", "params"), "curve": ("history", "epochs"), "time": ("time_grads",)}
        if self.kind in need and (self.table not in need[self.kind] or not self.column):
            raise ValueError(f"figure kind {self.kind} needs table one of {', '.join(need[self.kind])} and a column")
        return self


class ClaimConfig(Strict):
    """A published claim, what is measured here and when it holds (README: Reproducing the literature)."""

    paper: ClaimPaper
    statement: str = Field(min_length=1)  # the claim in one sentence
    setup: str = Field(min_length=1)  # the paper's setup
    published: str = Field(min_length=1)  # the paper's number(s) as published
    kind: Literal["init", "trained", "theory"]  # init: one step, statistics of step 0; theory: nothing trains
    quick: bool = False  # part of `ablate reproduce --quick`
    requires: list[str] = []  # instruments the claim needs (could not run until they are registered)
    measure: dict[str, Union[str, float]]  # name -> expression, in order; later ones may use earlier names
    show: Optional[list[str]] = None  # measures shown as "ours" (default: all)
    holds: str  # a condition over the measures
    expected: str = Field(min_length=1)  # the expected direction/value and tolerance, in words
    tolerance: ClaimTolerance
    differs: str = ""  # what differs from the paper (scale, data, optimiser)
    figure: ClaimFigure = ClaimFigure()

    @field_validator("measure")
    @classmethod
    def _measure(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("claim.measure is empty: name at least one quantity")
        reserved = _claim_reserved()
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) or k in reserved]
        if bad:
            raise ValueError(f"measure name '{bad[0]}' must be an identifier and not a function or constant name")
        return {k: str(x) for k, x in v.items()}

    def compile(self, extra_tables: tuple[str, ...] = ()) -> dict[str, Any]:
        """Parses every expression; returns ``{dotted key: ablations.claims.Expression}`` in evaluation order.

        Raises:
            ValueError: ``"<dotted key>: <problem>"`` for the first expression that is not allowed.
        """
        from ablations import claims

        out: dict[str, Any] = {}
        tables = tuple(self.requires) + tuple(extra_tables)
        names: list[str] = []
        for key, text in [*((f"measure.{k}", x) for k, x in self.measure.items()), ("holds", self.holds),
                          *((f"figure.ref.{k}", x) for k, x in self.figure.ref.items())]:
            try:
                out[key] = claims.parse(str(text), names, tables)
            except claims.ExpressionError as err:
                raise ValueError(f"claim.{key}: {err}") from None
            if key.startswith("measure."):
                names.append(key.split(".", 1)[1])
        for name in self.show or []:
            if name not in self.measure:
                raise ValueError(f"claim.show: '{name}' is not a measure.{suggest(name, list(self.measure))}")
        if self.figure.table and self.figure.table not in tables:
            try:  # the figure's table and column must be stored ones
                claims.parse(f'column("{self.figure.table}", "{self.figure.column}")')
            except claims.ExpressionError as err:
                raise ValueError(f"claim.figure: {err}") from None
        return out


def _claim_reserved() -> set[str]:
    """Names a measure may not take: the claim language's functions and constants (imported lazily)."""
    from ablations.claims import CONSTANTS, FUNCTIONS

    return set(FUNCTIONS) | set(CONSTANTS)
