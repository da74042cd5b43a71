"""Share of dead units (zero derivative for the whole batch) against depth."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="dead_units_vs_depth", section="Gradient flow", order=80, needs=("blocks:act_dead",))
def dead_units_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "act_dead" not in run.blocks:
        return None
    return vs_depth(plan, run.blocks, "act_dead", "dead units (fraction)", "Dead units by depth",
                    "Fraction of a block's units whose activation derivative is zero for every example of the "
                    "batch (dead ReLUs pass no gradient at all).", log=False, ylim=(-0.03, 1.03))
