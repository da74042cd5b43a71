"""Weight-gradient norm of each block's kernel against depth: where the gradient vanishes."""

from __future__ import annotations

from ablations.diagnose import block_kernels
from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="grad_vs_depth", section="Gradient flow", order=20, needs=("params:grad_norm",))
def grad_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    return vs_depth(plan, block_kernels(run.params), "grad_norm", "||dL/dW|| (L2 norm)",
                    "Weight-gradient norm by depth",
                    "L2 norm of each block's first kernel gradient at the first, middle and last captured step. "
                    "A line falling toward block 0 means the gradient vanishes on its way to the input.", log=True)
