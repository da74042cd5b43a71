"""Per arm: how far each block's kernel has moved from its initial value (``params.init_distance_ratio``,
``capture.instruments.init_distance``)."""

from __future__ import annotations

import matplotlib
import numpy as np

from ablations.diagnose import block_kernels
from ablations.report.arm import ArmView
from ablations.report.figures import figure
from ablations.report.plotting import SEQUENTIAL, Plot, finite, subplots


@figure(key="init_distance", section="Gradient flow", scope="arm", order=45, needs=("params:init_distance_ratio",))
def arm_init_distance(arm: ArmView) -> Plot | None:
    k = block_kernels(arm.params) if not arm.params.empty else arm.params
    k = finite(k, "init_distance_ratio", positive=True) if "init_distance_ratio" in k else k.iloc[0:0]
    if k.empty:
        return None
    fig, axes = subplots(1, 2, figsize=(9.4, 3.4))
    cmap = matplotlib.colormaps[SEQUENTIAL]
    depths = sorted(k["depth"].unique())
    for depth, d in k.groupby("depth"):
        d = d.sort_values("step")
        colour = cmap(depths.index(depth) / max(1, len(depths) - 1) * 0.9)
        axes[0].plot(d["step"], d["init_distance_ratio"], color=colour, lw=1.3,
                     label=str(d["block"].iloc[0]) if depth in (depths[0], depths[-1]) else None)
    last = k[k["step"] == k["step"].max()].sort_values("depth")
    axes[1].plot(last["depth"], last["init_distance_ratio"], "o-", color="k", ms=3, lw=1.3,
                 label=f"step {int(last['step'].iloc[0])}")
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("block (0 = nearest the input)")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylabel("||W_t - W_0|| / ||W_0||")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    data = k[["step", "depth", "block", "layer", "init_distance", "init_distance_ratio"]]
    ratio = float(np.nanmax(last["init_distance_ratio"]) / np.nanmin(last["init_distance_ratio"]))
    return Plot(fig, data, "Distance from initialisation by block",
                "Relative distance of each block's kernel from its initial value (Cockpit's distance instrument), "
                "over training (dark: block 0, yellow: the last block) and against depth at the last captured "
                f"step (spread between blocks there: a factor {ratio:.3g}). Blocks whose gradient vanishes barely "
                "leave their initialisation (the first captured step reads 0 and is not drawn).")
