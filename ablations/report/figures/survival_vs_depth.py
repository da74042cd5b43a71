"""Stochastic depth: how often each block's residual branch was on, against depth."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, finite, vs_depth


@figure(key="survival_vs_depth", section="Gradient flow", order=120, needs=("blocks:active",))
def survival_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    if run.blocks.empty or "active" not in run.blocks:
        return None
    b = finite(run.blocks, "active").sort_values("step")
    if b.empty:
        return None
    # Running mean over the captured steps so far: the empirical survival rate, which approaches p_l.
    b = b.assign(survival=b.groupby(["arm_id", "depth"])["active"].transform(lambda s: s.expanding().mean()))
    return vs_depth(plan, b, "survival", "branch active (fraction)",
                    "Stochastic depth: how often each block was on",
                    "Fraction of the captured steps (batch mode) or examples (sample mode) for which each "
                    "block's residual branch was active, averaged from the first captured step to the one shown; "
                    "it approaches the survival probability p_l (Huang et al. 2016: linear from 1 to p_L).",
                    log=False, ylim=(-0.03, 1.03))
