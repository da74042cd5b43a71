"""Residual branch norm over skip norm against depth."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="branch_ratio_vs_depth", section="Gradient flow", order=90, needs=("blocks:branch_ratio",))
def branch_ratio_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "branch_ratio" not in run.blocks:
        return None
    return vs_depth(plan, run.blocks, "branch_ratio", "||branch|| / ||skip|| (ratio)",
                    "Residual branch against skip by depth",
                    "Norm of each residual block's branch output over the norm of its skip input at the sum. "
                    "Far below 1 the block is close to the identity (ReZero at init, scaled branches); far above "
                    "1 the branches dominate and the signal grows with depth.", log=True)
