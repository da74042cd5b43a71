"""Decay rate (decades per block) at init and at the end: one number per arm that ranks architectures."""

from __future__ import annotations

import pandas as pd

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import BAND_NOTE, Plan, Plot, band, facet_lines, finite, with_panels
from ablations.report.stats import arm_decay


@figure(key="decay_rate", section="Gradient flow", order=10, needs=("params:grad_norm",))
def decay_rate(run: RunData, plan: Plan) -> Plot | None:
    """The stored decay rates (arm summaries), by network depth where that is an axis, else by grid point."""
    d = arm_decay(run)
    if d.empty:
        return None
    meta = pd.DataFrame([{"arm_id": s["arm_id"], "seed": s.get("seed"), "arm": plan.labels[s["arm_id"]],
                          **({plan.row: plan.rows[s["arm_id"]]} if plan.row else {}),
                          "col": plan.cols[s["arm_id"]]} for s in run.summaries])
    long = d.melt(id_vars="arm_id", value_vars=["decay_init", "decay_end"], var_name="when", value_name="decay")
    long["when"] = long["when"].map({"decay_init": "init", "decay_end": "end"})
    data = finite(long.merge(meta, on="arm_id"), "decay")
    if data.empty:
        return None
    col, col_order = with_panels(data, plan, "when", ["init", "end"])
    x = plan.row if plan.row_is_depth else "arm"
    labels = [h for h in plan.hue_order if h in set(data["arm"])]
    if x == "arm":  # no network-depth axis: one position per grid point
        data["x"] = data["arm"].map({h: i for i, h in enumerate(labels)})
    else:
        data["x"] = data[plan.row]
    row = None if plan.row_is_depth else plan.row  # network depth is the x axis here
    agg = band(data, "x", "decay", [plan.hue, col, row], log=False)
    g = facet_lines(agg, plan, "x", "decay", row=row, col=col, col_order=col_order, height=2.8, aspect=1.3)
    for ax in g.axes.flat:
        ax.axhline(0, color="0.35", lw=0.8)
        if x == "arm":
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            ax.set_xticks(sorted(data["x"].unique()))
    g.set_axis_labels("network depth (blocks)" if x != "arm" else "", "decades per block")
    return Plot(g, data.drop(columns=["x"]), "Gradient decay rate",
                "Least-squares slope of log10(block kernel-gradient norm) against block depth at the first (init) "
                "and last (end) captured step: decades lost per block toward the input. 0 is ideal; 0.6 is a "
                "factor 4 per block (log10 4 = 0.6); negative values mean the gradient grows toward the input. "
                + BAND_NOTE + ".")
