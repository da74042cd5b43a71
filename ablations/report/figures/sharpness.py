"""Sharpness over training with each arm's stability bound (2/lr for SGD) dashed: the edge-of-stability picture."""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import BAND_NOTE, Plan, Plot, band, facet_lines, finite, keep_cols, panels


@figure(key="sharpness", section="Curvature", order=183, needs=("curvature:sharpness",))
def sharpness(run: RunData, plan: Plan) -> Plot | None:
    c = run.curvature
    c = finite(c, "sharpness") if "sharpness" in c else c.iloc[0:0]
    if c.empty:
        return None
    pre = np.isfinite(c["preconditioned_sharpness"].to_numpy(float))
    c = c.assign(bounded=np.where(pre, c["preconditioned_sharpness"], c["sharpness"]))
    log = bool((c["bounded"] > 0).all())
    row, col = plan.row, ("col" if plan.col else None)  # the column axis' labels are in column "col"
    agg = band(c, "step", "bounded", [plan.hue, row, col], log)
    dashed = Line2D([], [], color="0.3", ls="--", lw=1.2)
    g = facet_lines(agg, plan, "step", "bounded", row=row, col=col, col_order=plan.col_order or None, log=log,
                    marker=None, height=3.0, aspect=1.5, extra_legend={"stability bound (2/lr for SGD)": dashed})
    drawn = list(panels(g, c, row, col)) if (row or col) else [(g.axes.flat[0], c)]
    for ax, sel in drawn:
        for hue, d in sel.groupby(plan.hue, sort=False):
            b = d.groupby("step")["stability_bound"].mean()
            b = b[np.isfinite(b)]
            if not b.empty:
                ax.plot(b.index, b.to_numpy(), color=plan.palette[hue], ls="--", lw=1.2)
    ylabel = "sharpness (Adam: preconditioned)" if pre.any() else "sharpness lambda_max(H)"
    g.set_axis_labels("optimizer step", ylabel)
    data = keep_cols(c, plan, "step", "epoch", "sharpness", "preconditioned_sharpness", "stability_bound",
                     "edge_ratio", "hessian_trace", "sharpness_rel_change", "lr")
    return Plot(g, data, "Sharpness and the edge of stability",
                "Top Hessian eigenvalue of the training loss (signed eigenvalue of largest magnitude, power "
                "iteration on the step's batch; capture.instruments.curvature) at every captured step; dashed, "
                "in the arm's colour: the optimizer's stability bound at the rate of that step (2/lr for plain "
                "SGD, (2 + 2 momentum)/lr with heavy-ball momentum; for Adam the preconditioned sharpness "
                "against (2 + 2 beta_1)/((1 - beta_1) lr)). Under full-batch gradient descent the sharpness "
                "rises (progressive sharpening) until it reaches the bound and then hovers there: the edge of "
                "stability (Cohen et al. 2021). " + BAND_NOTE + ".")
