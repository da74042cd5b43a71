"""Per arm: loss per step, loss and accuracy per epoch (train and validation), global gradient norm."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.report.arm import ArmView
from ablations.report.figures import figure
from ablations.report.plotting import Plot, finite, subplots, wants_log


def _panels(h: pd.DataFrame, e: pd.DataFrame) -> list[str]:
    """The panels the arm has finite data for, in drawing order."""
    wanted = (("step", h, "loss"), ("loss", e, "loss"), ("accuracy", e, "accuracy"), ("grad", h, "global_grad_norm"))
    return [p for p, df, col in wanted if col in df and np.isfinite(df[col]).any()]


def _per_step(ax: Any, h: pd.DataFrame, p: str) -> pd.DataFrame:
    col = "loss" if p == "step" else "global_grad_norm"
    d = finite(h, col)
    ax.plot(d["step"], d[col], lw=1.2, color="C0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (batch)" if p == "step" else "||g|| all parameters (L2)")
    if wants_log(d[col]):
        ax.set_yscale("log")
    return d[["step", "epoch", col]].rename(columns={col: "value"}).assign(series=col)


def _per_epoch(ax: Any, e: pd.DataFrame, p: str) -> list[pd.DataFrame]:
    data = []
    for split, col, ls in (("train", p, "-"), ("validation", f"val_{p}", "--")):
        if col in e:
            d = finite(e, col)
            ax.plot(d["epoch"], d[col], ls=ls, marker="o", ms=3, color="C0" if split == "train" else "C1",
                    label=split)
            data.append(d[["epoch", col]].rename(columns={col: "value"}).assign(series=col))
    ax.set_xlabel("epoch")
    ax.set_ylabel(p)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return data


@figure(key="training", section="Training", scope="arm", order=60,
        needs=("history:loss | epochs:loss | epochs:accuracy | history:global_grad_norm",))
def arm_training(arm: ArmView) -> Plot | None:
    h, e = arm.history, arm.epochs
    panels = _panels(h, e)
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    data = []
    for ax, p in zip(axes.flat, panels):
        ax.grid(alpha=0.3)
        if p in ("step", "grad"):
            data.append(_per_step(ax, h, p))
        else:
            data.extend(_per_epoch(ax, e, p))
    return Plot(fig, pd.concat(data, ignore_index=True), "Training curves",
                "Mini-batch loss per step, epoch loss and accuracy (solid: training split, dashed: validation), and "
                "the global gradient norm over all parameters per step.")
