"""Layer x step heatmaps of the log10 kernel-gradient norm, one panel per grid point (its first seed)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from ablations.diagnose import block_kernels
from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import SEQUENTIAL, Plan, Plot, downsample_steps, finite

MAX_HEATMAPS = 24  # panels; more grid points are left out (and counted in the caption)


def _first_seeds(run: RunData, plan: Plan) -> list[str]:
    """One arm per grid point: the first seed, in sweep order."""
    first: dict[tuple[str, str, str], str] = {}
    for s in run.summaries:
        first.setdefault((plan.labels[s["arm_id"]], str(plan.rows[s["arm_id"]]), plan.cols[s["arm_id"]]), s["arm_id"])
    return list(first.values())


@figure(key="grad_heatmaps", section="Gradient flow", order=50, needs=("params:grad_norm",))
def grad_heatmaps(run: RunData, plan: Plan) -> Plot | None:
    k = finite(block_kernels(run.params), "grad_norm", positive=True)
    if k.empty:
        return None
    arms = [a for a in _first_seeds(run, plan) if (k["arm_id"] == a).any()]
    shown, omitted = arms[:MAX_HEATMAPS], len(arms) - MAX_HEATMAPS
    k = downsample_steps(k[k["arm_id"].isin(shown)], 150)
    k = k.assign(log10_grad_norm=np.log10(k["grad_norm"]))
    cells = k.groupby(["arm_id", "depth", "step"], sort=False)["log10_grad_norm"].mean().reset_index()
    lo, hi = np.nanpercentile(cells["log10_grad_norm"], [1, 99])
    ncol = min(4, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.2 * nrow + 0.4), squeeze=False, sharex=False)
    mesh = None
    for ax, arm in zip(axes.flat, shown):
        c = cells[cells["arm_id"] == arm].pivot(index="depth", columns="step", values="log10_grad_norm")
        steps, depths = c.columns.to_numpy(), c.index.to_numpy()
        xe = np.append(steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))
        ye = np.append(depths, depths[-1] + 1) - 0.5
        mesh = ax.pcolormesh(xe, ye, c.to_numpy(), cmap=SEQUENTIAL, vmin=lo, vmax=hi, shading="flat")
        status = next(s.get("status") for s in run.summaries if s["arm_id"] == arm)
        ax.set_title(plan.short[arm] + ("" if status == "completed" else f" ({status})"), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax in axes[-1, :]:
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("block", fontsize=8)
    fig.tight_layout()
    cbar = fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
    cbar.set_label("log10 ||dL/dW|| (L2 norm)")
    note = f" {omitted} more grid points are not shown." if omitted > 0 else ""
    csv = cells.merge(k[["arm_id", "arm"]].drop_duplicates(), on="arm_id")
    return Plot(fig, csv, "Weight-gradient norm over depth and time",
                "log10 of each block kernel's gradient norm (colour) by block (rows, 0 = nearest the input) and "
                "optimizer step (columns), one panel per grid point (first seed; titles list its values of "
                f"{', '.join(run.axes)}), one colour scale for all "
                f"panels (1st to 99th percentile). Dark rows at the bottom: gradient vanishing toward the input."
                f"{note}")
