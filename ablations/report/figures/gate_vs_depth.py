"""Mean highway transform gate against depth."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="gate_vs_depth", section="Gradient flow", order=100, needs=("blocks:gate_mean",))
def gate_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "gate_mean" not in run.blocks:
        return None
    return vs_depth(plan, run.blocks, "gate_mean", "transform gate (mean)", "Highway transform gate by depth",
                    "Mean of each highway block's transform gate T(x): near 0 the block carries its input "
                    "through (Srivastava et al. 2015 start it there with a negative gate bias).", log=False,
                    ylim=(-0.03, 1.03))
