"""ReZero's learned residual weights against depth."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="rezero_alpha_vs_depth", section="Gradient flow", order=110, needs=("blocks:alpha",))
def rezero_alpha_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "alpha" not in run.blocks:
        return None
    return vs_depth(plan, run.blocks, "alpha", "alpha (residual weight)", "ReZero residual weights by depth",
                    "Each ReZero block's learned residual weight alpha (x + alpha * F(x)), before the step's "
                    "update: 0 at init, so every block starts as the identity (Bachlechner et al. 2020).",
                    log=False)
