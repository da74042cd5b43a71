"""Share of saturated activation entries against depth."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="saturation_vs_depth", section="Gradient flow", order=70, needs=("blocks:act_saturation",))
def saturation_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "act_saturation" not in run.blocks:
        return None
    return vs_depth(plan, run.blocks, "act_saturation", "saturated entries (fraction)",
                    "Activation saturation by depth",
                    "Fraction of activation entries whose derivative is below 5% of the activation's maximum "
                    "derivative (saturated sigmoid/tanh units, ReLU units at zero).", log=False, ylim=(-0.03, 1.03))
