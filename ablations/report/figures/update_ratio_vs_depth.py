"""Update-to-weight ratio of each block kernel against depth: which layers are barely learning."""

from __future__ import annotations

from ablations.diagnose import block_kernels
from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import STALL_RATIO, Plan, Plot, vs_depth


@figure(key="update_ratio_vs_depth", section="Gradient flow", order=60, needs=("params:update_ratio",))
def update_ratio_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    return vs_depth(plan, block_kernels(run.params), "update_ratio", "||ΔW|| / ||W|| (ratio)",
                    "Update-to-weight ratio by depth",
                    "Norm of the update the optimizer applied over the weight norm, per block kernel. Below the "
                    "dashed 1e-3 line a layer is barely learning; a missing point is an update that changed "
                    "nothing at all (below float32 resolution).", log=True, hline=STALL_RATIO)
