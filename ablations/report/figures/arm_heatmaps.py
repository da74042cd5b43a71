"""Per arm: log10 gradient norms by block and optimizer step (kernel and pre-activation gradients)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.report.arm import ArmView, gradient_panels
from ablations.report.figures import figure
from ablations.report.plotting import Plot, depth_mesh, downsample_steps, subplots


def _heat(ax: Any, fig: Any, df: pd.DataFrame, y: str, label: str) -> pd.DataFrame:
    d = downsample_steps(df, 150)
    cells = d.assign(v=np.log10(d[y])).groupby(["depth", "step"])["v"].mean().reset_index()
    depth_mesh(ax, fig, cells.pivot(index="depth", columns="step", values="v"), f"log10 {label}", "optimizer step",
               last_width=1)
    return cells.rename(columns={"v": f"log10_{y}"})


@figure(key="heatmaps", section="Gradient flow", scope="arm", order=20,
        needs=("params:grad_norm | blocks:act_grad_norm",))
def arm_heatmaps(arm: ArmView) -> Plot | None:
    panels = gradient_panels(arm, ("||dL/dW||", "||dL/dz||"))
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(4.6 * len(panels), 3.2), squeeze=False)
    parts = [_heat(ax, fig, d, y, lab) for ax, (d, y, lab) in zip(axes.flat, panels)]
    data = parts[0] if len(parts) == 1 else parts[0].merge(parts[1], on=["depth", "step"], how="outer")
    return Plot(fig, data, "Gradient norm over depth and time",
                "log10 of the block kernel-gradient norm (left) and of the pre-activation gradient norm (right), "
                "by block and optimizer step (steps binned for long runs).", margin_right=0.75)
