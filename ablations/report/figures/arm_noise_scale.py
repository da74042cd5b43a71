"""Per arm: the gradient noise scale B_simple per block over training, and the per-example gradient norms
(``per_example.parquet``, ``capture.instruments.per_example``)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from ablations.report.arm import ArmView
from ablations.report.figures import figure
from ablations.report.plotting import SEQUENTIAL, Plot, subplots

MAX_BINS = 20


def binned(t: pd.DataFrame) -> pd.DataFrame:
    """Per block and bin of captured steps: B_simple as the ratio of the bin's mean tr(Sigma) and mean |G|^2
    (McCandlish et al. 2018 average both before dividing: the per-step ratio is noisy), and the mean
    per-example gradient norm."""
    steps = np.sort(t["step"].unique())
    edges = {s: int(b) for b, chunk in enumerate(np.array_split(steps, min(MAX_BINS, len(steps)))) for s in chunk}
    t = t.assign(bin=t["step"].map(edges))
    g = t.groupby(["block", "depth", "bin"], sort=False)
    out = g.agg(step=("step", "mean"), trace_sigma=("trace_sigma", "mean"), grad_sq=("grad_sq", "mean"),
                mean_norm=("mean_norm", "mean"), std_norm=("std_norm", "mean")).reset_index()
    out["b_simple"] = out["trace_sigma"] / out["grad_sq"]
    return out


@figure(key="noise_scale", section="Gradient flow", scope="arm", order=35, needs=("per_example:b_simple",))
def arm_noise_scale(arm: ArmView) -> Plot | None:
    t = arm.table("per_example")
    t = t[np.isfinite(t["trace_sigma"]) & np.isfinite(t["grad_sq"])] if not t.empty else t
    if t.empty:
        return None
    b = binned(t)
    fig, axes = subplots(1, 2, figsize=(9.4, 3.4))
    cmap = matplotlib.colormaps[SEQUENTIAL]
    depths = sorted(d for d in b["depth"].unique() if d >= 0)
    for (block, depth), d in b.groupby(["block", "depth"], sort=False):
        d = d.sort_values("step")
        whole = depth < 0
        style = dict(color="k", lw=2.2, ls="--", label="whole model") if whole else \
            dict(color=cmap(depths.index(depth) / max(1, len(depths) - 1) * 0.9), lw=1.3,
                 label=block if depth in (depths[0], depths[-1]) else None)
        pos = d[d["b_simple"] > 0]
        axes[0].plot(pos["step"], pos["b_simple"], **style)
        axes[1].plot(d["step"], d["mean_norm"], **style)
    for ax, lab in zip(axes, ("B_simple = tr(Σ) / |G|² (examples)", "mean per-example ||g_i||")):
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return Plot(fig, b, "Gradient noise scale by block",
                "Left: the gradient noise scale B_simple (McCandlish et al. 2018: about the batch size beyond which "
                "larger batches stop paying off) of each block's kernels (dark: block 0, yellow: the last block) "
                "and of the whole model (dashed), from exact per-example gradients; each point is the ratio of "
                "tr(Σ) and |G|² averaged over a bin of captured steps (bins with a non-positive |G|² estimate, "
                "where noise swamps the signal, are left out). Right: the mean norm of the examples' own gradients.")
