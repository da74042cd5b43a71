"""Keras epoch-end loss and accuracy (training and validation split) per epoch."""

from __future__ import annotations

import pandas as pd

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import (BAND_NOTE, Plan, Plot, add_legend_entries, band, baseline_lines, facet_lines,
                                       finite, keep_cols, wants_log, with_panels)


def _epoch_long(e: pd.DataFrame) -> pd.DataFrame:
    """epochs.parquet (loss, accuracy, val_loss, val_accuracy, ...) -> rows of (epoch, metric, split, value)."""
    metrics = [c for c in e.columns
               if not c.startswith("val_") and (c in ("loss", "accuracy") or f"val_{c}" in e.columns)]
    parts = []
    for m in metrics:
        for split, colname in (("train", m), ("validation", f"val_{m}")):
            if colname in e.columns:
                parts.append(e.assign(metric=m, split=split, value=e[colname]))
    return pd.concat(parts, ignore_index=True) if parts else e.iloc[0:0]


@figure(key="epoch_curves", section="Training", order=170, needs=("epochs:loss",))
def epoch_curves(run: RunData, plan: Plan) -> Plot | None:
    e = run.epochs
    if e.empty or "loss" not in e.columns:
        return None
    data = finite(_epoch_long(e), "value")
    if data.empty:
        return None
    metrics = sorted(dict.fromkeys(data["metric"]), key=lambda m: (m != "loss", m))  # loss first
    splits = [s for s in ("train", "validation") if s in set(data["split"])]
    col, col_order = with_panels(data, plan, "metric", metrics)
    agg = band(data, "epoch", "value", [plan.hue, plan.row, col, "split"], log=False)
    g = facet_lines(agg, plan, "epoch", "value", col=col, col_order=col_order, style="split", style_order=splits,
                    sharey="col", height=2.6, aspect=1.3)
    for (key, ax) in g.axes_dict.items():
        keys = key if isinstance(key, tuple) else (key,)
        name = str(keys[-1]).split(" · ")[0]
        ax.set_ylabel(name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if name == "loss" and wants_log(data.loc[data["metric"] == "loss", "value"]):
            ax.set_yscale("log")
    for ax in g.axes[-1, :]:
        ax.set_xlabel("epoch")
    add_legend_entries(g, baseline_lines(run, g, data, plan.row, col, only=lambda d: (d["metric"] == "loss").all()))
    return Plot(g, keep_cols(data, plan, "epoch", "metric", "split", "value"), "Loss and accuracy per epoch",
                "Keras epoch-end metrics: solid lines on the training split (running mean over the epoch), dashed "
                "on the validation split. Accuracy is a fraction (chance on 10 classes: 0.1). " + BAND_NOTE + ".")
