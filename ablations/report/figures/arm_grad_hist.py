"""Per arm: distribution of log10|dL/dW| per block at the first and last captured step (``grad_hist``)."""

from __future__ import annotations

import math

from ablations.report.arm import ArmView
from ablations.report.figures import figure
from ablations.report.plotting import Plot, depth_mesh, subplots


@figure(key="grad_hist", section="Gradient flow", scope="arm", order=30, needs=("grad_hist:fraction",))
def arm_grad_hist(arm: ArmView) -> Plot | None:
    h = arm.grad_hist if "grad_hist" in arm.tables else None
    if h is None or h.empty:
        return None
    h = h[h["bin"] >= 0]
    steps = sorted({int(h["step"].min()), int(h["step"].max())})
    fig, axes = subplots(1, len(steps), figsize=(4.6 * len(steps), 3.2), squeeze=False)
    for ax, step in zip(axes.flat, steps):
        c = h[h["step"] == step].pivot(index="depth", columns="log10_lo", values="fraction")
        depth_mesh(ax, fig, c, "fraction of entries", "log10 |dL/dW|", last_width=math.log10(2.0), vmin=0)
        ax.set_title(f"step {step}", fontsize=9)
    data = h[h["step"].isin(steps)][["step", "depth", "bin", "log10_lo", "log10_hi", "count", "fraction"]]
    return Plot(fig, data, "Gradient distribution by depth",
                "Fraction of each block's kernel-gradient entries per factor-2 bin of |dL/dW| (capture.histograms), "
                "at the first and last captured step; exact zeros are counted apart (bin -1 in the CSV). A "
                "vanishing gradient is a mass sliding left toward block 0, not just a smaller norm.", margin_right=0.75)
