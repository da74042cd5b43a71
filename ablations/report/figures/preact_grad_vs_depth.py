"""Back-propagated dL/d(pre-activation) against depth: the signal the Jacobians multiply."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="preact_grad_vs_depth", section="Gradient flow", order=30, needs=("blocks:act_grad_norm",))
def preact_grad_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "act_grad_norm" not in run.blocks:
        return None
    return vs_depth(plan, run.blocks, "act_grad_norm", "||dL/dz|| pre-activation (L2)",
                    "Back-propagated gradient by depth",
                    "L2 norm of dL/d(pre-activation) of each block's first linear layer: the signal that is "
                    "multiplied by one Jacobian per layer on its way to the input (Glorot & Bengio 2010).",
                    log=True)
