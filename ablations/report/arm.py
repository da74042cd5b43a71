"""One arm's view of a run, for the per-arm pages and their figures (``scope="arm"`` in
:mod:`ablations.report.figures`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from ablations.diagnose import block_kernels
from ablations.report.data import TABLES, RunData
from ablations.report.plotting import Plan, finite


@dataclasses.dataclass
class ArmView:
    """One arm's summary, label and tables (rows of that arm only; ``arm.params``, ``arm.blocks``, ...)."""

    arm_id: str
    summary: dict[str, Any]
    label: str
    activation: str | None
    tables: dict[str, pd.DataFrame]
    error: str | None = None

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def table(self, name: str) -> pd.DataFrame:
        """The arm's rows of table ``name`` (empty when it has none), as :meth:`RunData.table`."""
        return self.tables.get(name, pd.DataFrame())


def arm_views(run: RunData, plan: Plan) -> list[ArmView]:
    """Splits the run's tables by arm once (not one filter per arm and table)."""
    split = {t: dict(tuple(run.table(t).groupby("arm_id", sort=False))) if not run.table(t).empty else {}
             for t in TABLES}
    return [ArmView(arm_id=s["arm_id"], summary=s, label=plan.labels.get(s["arm_id"], ""),
                    activation=run.activation(s["arm_id"]), error=run.errors.get(s["arm_id"]),
                    tables={t: split[t].get(s["arm_id"], pd.DataFrame()) for t in TABLES})
            for s in run.summaries]


def gradient_panels(arm: ArmView, labels: tuple[str, str]) -> list[tuple[pd.DataFrame, str, str]]:
    """``(rows, column, axis label)`` of the block kernel-gradient norm and the pre-activation gradient norm,
    those the arm has finite positive values of (``labels``: their axis labels)."""
    k = finite(block_kernels(arm.params), "grad_norm", positive=True) if not arm.params.empty else pd.DataFrame()
    b = finite(arm.blocks, "act_grad_norm", positive=True) if "act_grad_norm" in arm.blocks else pd.DataFrame()
    return [(d, y, lab) for d, y, lab in ((k, "grad_norm", labels[0]), (b, "act_grad_norm", labels[1]))
            if not d.empty]
