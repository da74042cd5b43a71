"""Per arm: dL/dh_t of each recurrent layer against the lag to the last time step (``time_grads``)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ablations.report.arm import ArmView
from ablations.report.figures import figure
from ablations.report.plotting import SEQUENTIAL, Plot, finite, snapshots, subplots


@figure(key="time_lag", section="Gradient flow", scope="arm", order=50, needs=("time_grads:act_grad_norm",))
def arm_time_lag(arm: ArmView) -> Plot | None:
    t = arm.time_grads
    if t.empty or "act_grad_norm" not in t:
        return None
    t = finite(t, "act_grad_norm", positive=True)
    if t.empty:
        return None
    t = t.assign(lag=t.groupby(["step", "layer"])["t"].transform("max") - t["t"])
    layers = list(dict.fromkeys(t["layer"]))
    fig, axes = subplots(1, len(layers), figsize=(4.2 * len(layers), 3.3), squeeze=False)
    steps = snapshots(t)
    cmap = plt.get_cmap(SEQUENTIAL)
    for ax, layer in zip(axes.flat, layers):
        for i, st in enumerate(steps):
            d = t[(t["layer"] == layer) & (t["step"] == st)].sort_values("lag")
            ax.plot(d["lag"], d["act_grad_norm"], lw=1.4, color=cmap(i / max(1, len(steps) - 1) * 0.9),
                    label=f"step {st}")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("time lag to the last step (steps)")
        ax.set_ylabel("||dL/dh_t|| (L2)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return Plot(fig, t[t["step"].isin(steps)][["step", "layer", "t", "lag", "act_grad_norm"]],
                "Gradient through time", "dL/dh_t of each recurrent layer against the lag to the last time step, at "
                "evenly spaced captured steps.")
