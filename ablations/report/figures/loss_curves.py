"""Mini-batch training loss per step, with the trivial predictor's loss where the arms share one."""

from __future__ import annotations

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import (BAND_NOTE, ROW_LABEL, Plan, Plot, add_legend_entries, band, baseline_lines,
                                       downsample_steps, facet_lines, finite, keep_cols, wants_log)


@figure(key="loss_curves", section="Training", order=160, needs=("history:loss",))
def loss_curves(run: RunData, plan: Plan) -> Plot | None:
    h = finite(run.history, "loss") if "loss" in run.history else run.history.iloc[0:0]
    if h.empty:
        return None
    log = wants_log(h["loss"])
    h = finite(h, "loss", positive=True) if log else h
    data = downsample_steps(h)
    # Curves share the x axis (steps), so network depth goes to the columns and any column axis to the rows.
    row, col = ("col", plan.row) if plan.col else (None, plan.row)
    agg = band(data, "step", "loss", [plan.hue, row, col], log)
    col_order = plan.row_order if col == plan.row else None
    g = facet_lines(agg, plan, "step", "loss", row=row, col=col, col_order=col_order, log=log, marker=None,
                    height=2.8, aspect=1.3)
    g.set_titles(row_template="{row_name}" if row in (ROW_LABEL, "col") else "{row_var} = {row_name}",
                 col_template="{col_var} = {col_name}" if col == plan.row and plan.row_is_depth else "{col_name}")
    add_legend_entries(g, baseline_lines(run, g, data, row, col))
    g.set_axis_labels("optimizer step", "training loss (batch mean)")
    binned = " Steps are binned for long runs." if data["step"].nunique() < h["step"].nunique() else ""
    return Plot(g, keep_cols(h, plan, "step", "epoch", "loss"), "Training loss per step",
                f"Mini-batch training loss at every captured step.{binned} Diverged arms stop at their last "
                f"finite loss. " + BAND_NOTE + ".")
