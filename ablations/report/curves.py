"""Run-level training figures: loss per step, loss and accuracy per epoch (train and validation).

Same signature as every figure function: ``fn(run, plan, out) -> Figure | None``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ablations.report.data import RunData
from ablations.report.plotting import (BAND_NOTE, ROW_LABEL, Figure, Plan, band, baseline_lines, downsample_steps,
                                       facet_lines, finite, keep_cols, save, wants_log, with_panels)


def _depth_as_columns(plan: Plan) -> tuple[str | None, str | None]:
    """Curves share the x axis (steps/epochs), so network depth goes to columns and any column axis to rows."""
    return ("col", plan.row) if plan.col else (None, plan.row)


def _add_legend_entries(g: Any, entries: dict[str, Any]) -> None:
    """Appends entries (e.g. the trivial-predictor line) to the figure legend made by facet_lines."""
    if not entries or not g.figure.legends:
        return
    old = g.figure.legends[-1]
    handles = old.legend_handles + list(entries.values())
    labels = [t.get_text() for t in old.get_texts()] + list(entries)
    title = old.get_title().get_text()
    old.remove()
    g.figure.legend(handles, labels, title=title, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def loss_curves(run: RunData, plan: Plan, out: Path) -> Figure | None:
    h = finite(run.history, "loss") if "loss" in run.history else run.history.iloc[0:0]
    if h.empty:
        return None
    log = wants_log(h["loss"])
    h = finite(h, "loss", positive=True) if log else h
    data = downsample_steps(h)
    row, col = _depth_as_columns(plan)
    agg = band(data, "step", "loss", [plan.hue, row, col], log)
    col_order = plan.row_order if col == plan.row else None
    g = facet_lines(agg, plan, "step", "loss", row=row, col=col, col_order=col_order, log=log, marker=None,
                    height=2.8, aspect=1.3)
    g.set_titles(row_template="{row_name}" if row in (ROW_LABEL, "col") else "{row_var} = {row_name}",
                 col_template="{col_var} = {col_name}" if col == plan.row and plan.row_is_depth else "{col_name}")
    _add_legend_entries(g, baseline_lines(run, g, data, row, col))
    g.set_axis_labels("optimizer step", "training loss (batch mean)")
    binned = " Steps are binned for long runs." if data["step"].nunique() < h["step"].nunique() else ""
    return save(g, out, "loss_curves", keep_cols(h, plan, "step", "epoch", "loss"), "Training loss per step",
                f"Mini-batch training loss at every captured step.{binned} Diverged arms stop at their last "
                f"finite loss. " + BAND_NOTE + ".", section="Training")


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


def epoch_curves(run: RunData, plan: Plan, out: Path) -> Figure | None:
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
    _add_legend_entries(g, baseline_lines(run, g, data, plan.row, col, only=lambda d: (d["metric"] == "loss").all()))
    return save(g, out, "epoch_curves", keep_cols(data, plan, "epoch", "metric", "split", "value"),
                "Loss and accuracy per epoch",
                "Keras epoch-end metrics: solid lines on the training split (running mean over the epoch), dashed "
                "on the validation split. Accuracy is a fraction (chance on 10 classes: 0.1). " + BAND_NOTE + ".",
                section="Training")
