"""Recurrent layers: dL/dh_t against the time lag to the end of the sequence (log y)."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import (BAND_NOTE, WHENS, Plan, Plot, band, facet_lines, finite, keep_cols, moments,
                                       with_panels)


@figure(key="grad_vs_time_lag", section="Gradient flow", order=130, needs=("time_grads:act_grad_norm",))
def grad_vs_time_lag(run: RunData, plan: Plan) -> Plot | None:
    t = finite(run.time_grads, "act_grad_norm", positive=True) if "act_grad_norm" in run.time_grads else None
    if t is None or t.empty:
        return None
    t = t.assign(lag=t.groupby(["arm_id", "step", "layer"])["t"].transform("max") - t["t"])
    data = moments(t)
    col, col_order = with_panels(data, plan, "when", WHENS)
    layers = list(dict.fromkeys(data["layer"]))
    style = "layer" if len(layers) > 1 else None
    agg = band(data, "lag", "act_grad_norm", [plan.hue, plan.row, col] + ([style] if style else []), log=True)
    g = facet_lines(agg, plan, "lag", "act_grad_norm", col=col, col_order=col_order, log=True, style=style,
                    style_order=layers, marker=None)
    g.set_axis_labels("time lag to the last step (steps)", "||dL/dh_t|| (L2 norm)")
    return Plot(g, keep_cols(data, plan, "when", "step", "layer", "t", "lag", "act_grad_norm"),
                "Gradient through time",
                "L2 norm of dL/dh_t of each recurrent layer against the lag between step t and the end of the "
                "sequence: a line falling to the right means the gradient vanishes through time (Pascanu et al. "
                "2013). " + BAND_NOTE + ".")
