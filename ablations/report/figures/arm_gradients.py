"""Per arm: kernel-gradient and pre-activation-gradient norm against depth at evenly spaced steps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ablations.report.arm import ArmView, gradient_panels
from ablations.report.figures import figure
from ablations.report.plotting import Plot, profiles, snapshots, subplots
from ablations.theory import attenuation_bound, max_derivative

BOUND = f"{max_derivative('sigmoid'):g}^(L-1-i)"  # "0.25^(L-1-i)"


@figure(key="gradients", section="Gradient flow", scope="arm", order=10,
        needs=("params:grad_norm | blocks:act_grad_norm",))
def arm_gradients(arm: ArmView) -> Plot | None:
    panels = gradient_panels(arm, ("||dL/dW|| block kernel (L2)", "||dL/dz|| pre-activation (L2)"))
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    rows = []
    for ax, (d, y, lab) in zip(axes.flat, panels):
        steps = snapshots(d)
        profiles(ax, d, y, steps, log=True)
        ax.set_ylabel(lab)
        if arm.activation == "sigmoid":  # the bound, anchored at the last block's value at the first step
            init = d[d["step"] == steps[0]].sort_values("depth")
            depth, last = int(init["depth"].max()) + 1, float(init[y].iloc[-1])
            dd = np.arange(depth)
            ax.plot(dd, last * attenuation_bound("sigmoid", depth - 1 - dd), "k--", lw=1, label=f"{BOUND} x last")
        rows.append(d[d["step"].isin(steps)][["step", "depth", y]].assign(quantity=y))
    axes.flat[0].legend(fontsize=7)
    return Plot(fig, pd.concat(rows, ignore_index=True), "Gradient norm by depth",
                "Block kernel-gradient norm and back-propagated dL/d(pre-activation) norm against depth at evenly "
                "spaced captured steps (dark: early, yellow: late)."
                + (f" Dashed: the sigmoid bound {BOUND} relative to the last block at the first step."
                   if arm.activation == "sigmoid" else ""))
