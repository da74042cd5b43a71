"""Per arm: update ratio, saturation and dead units against depth (one figure: what each block is doing)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ablations.diagnose import block_kernels
from ablations.report.arm import ArmView
from ablations.report.figures import figure
from ablations.report.plotting import STALL_RATIO, Plot, finite, profiles, snapshots, subplots


@figure(key="updates_activations", section="Gradient flow", scope="arm", order=40,
        needs=("params:update_ratio | blocks:act_saturation | blocks:act_dead",))
def arm_updates_activations(arm: ArmView) -> Plot | None:
    k = finite(block_kernels(arm.params), "update_ratio", positive=True) if not arm.params.empty else pd.DataFrame()
    b = arm.blocks
    cols = [(c, lab) for c, lab in (("act_saturation", "saturated entries (fraction)"),
                                    ("act_dead", "dead units (fraction)")) if c in b and np.isfinite(b[c]).any()]
    n = int(not k.empty) + len(cols)
    if n == 0:
        return None
    fig, axes = subplots(1, n, figsize=(4.0 * n, 3.3), squeeze=False)
    axes = list(axes.flat)
    data = []
    if not k.empty:
        ax = axes.pop(0)
        steps = snapshots(k)
        profiles(ax, k, "update_ratio", steps, log=True)
        ax.axhline(STALL_RATIO, color="0.35", ls="--", lw=1, label="1e-3")
        ax.set_ylabel("||ΔW|| / ||W|| (ratio)")
        ax.legend(fontsize=7)
        data.append(k[k["step"].isin(steps)][["step", "depth", "update_ratio"]])
    if cols:
        steps = snapshots(b)
        for ax, (c, lab) in zip(axes, cols):
            profiles(ax, finite(b, c), c, steps, log=False)
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(lab)
        if k.empty:
            axes[0].legend(fontsize=7)
        data.append(b[b["step"].isin(steps)][["step", "depth"] + [c for c, _ in cols]])
    merged = data[0] if len(data) == 1 else data[0].merge(data[1], on=["step", "depth"], how="outer")
    return Plot(fig, merged, "Updates and activations by depth",
                "Left: applied update norm over weight norm per block kernel; below the dashed 1e-3 line a layer is "
                "barely learning. Then: share of activation entries with a derivative below 5% of the maximum "
                "(saturated), and of units whose derivative is zero for the whole batch (dead), at evenly spaced "
                "captured steps (dark: early, yellow: late).")
