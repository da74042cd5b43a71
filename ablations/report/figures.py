"""Seaborn figures of a run: every figure is written as PNG plus the plotted data as CSV beside it.

Layout rule: the x axis is the block's depth position (or the step); a grid axis named ``*.depth`` (the
network depth) becomes the facet rows, since networks of different depth have different x ranges; the
other varying axes combine into the hue; seeds become a 95% confidence band (bootstrap over seeds).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ablations.diagnose import block_kernels  # noqa: E402
from ablations.report.data import RunData, short_names  # noqa: E402

PALETTE = "colorblind"  # colour-blind-safe (seaborn's variant of Okabe-Ito / Wong)
BAND = ("ci", 95)
STALL_RATIO = 1e-3  # update/weight ratio below which a layer is barely learning (LITERATURE.md 15)


@dataclasses.dataclass
class Figure:
    """A written figure: file names relative to the report folder, title and caption."""

    key: str
    title: str
    png: str
    csv: str
    caption: str


@dataclasses.dataclass
class Plan:
    """How arms map onto plot aesthetics."""

    hue: str | None  # column holding the hue label
    hue_order: list[str]
    row: str | None  # column for facet rows (the network depth axis)
    row_order: list[Any]


def plan_for(run: RunData) -> Plan:
    axes = run.axes
    names = short_names(axes)
    depth_axis = next((a for a in axes if a.endswith(".depth")), None)
    hue_axes = [a for a in axes if a != depth_axis]
    if hue_axes:
        labels = {s["arm_id"]: " / ".join(f"{names[a]}={_val(s['values'].get(a))}" for a in hue_axes)
                  for s in run.summaries}
    else:
        labels = {s["arm_id"]: "all arms" for s in run.summaries}
    for df in (run.history, run.epochs, run.params, run.blocks):
        if not df.empty:
            df["arm"] = df["arm_id"].map(labels)
    hue_order = list(dict.fromkeys(labels[s["arm_id"]] for s in run.summaries))
    row_order = sorted({s["values"].get(depth_axis) for s in run.summaries}) if depth_axis else []
    return Plan(hue="arm", hue_order=hue_order, row=depth_axis, row_order=row_order)


def _val(v: Any) -> str:
    from ablations.config import value_label

    return value_label(v)


def _save(g: Any, out: Path, key: str, data: pd.DataFrame, title: str, caption: str) -> Figure:
    fig = g.figure if hasattr(g, "figure") else g
    fig.suptitle(title, y=1.02, fontsize=12)
    fig.savefig(out / f"{key}.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data.to_csv(out / f"{key}.csv", index=False)
    return Figure(key=key, title=title, png=f"{key}.png", csv=f"{key}.csv", caption=caption)


def _moments(df: pd.DataFrame) -> pd.DataFrame:
    """Keeps the first, middle and last captured step of each arm, labelled init / middle / end."""
    parts = []
    for _, g in df.groupby("arm_id"):
        steps = np.sort(g["step"].unique())
        if len(steps) == 0:
            continue
        picks = {"init": steps[0], "middle": steps[len(steps) // 2], "end": steps[-1]}
        for when, st in picks.items():
            parts.append(g[g["step"] == st].assign(when=when))
    return pd.concat(parts, ignore_index=True) if parts else df.assign(when=[])


def _relplot(data: pd.DataFrame, plan: Plan, x: str, y: str, col: str | None, col_order: list | None,
             logy: bool, kind: str = "line", **kw: Any) -> Any:
    g = sns.relplot(
        data=data, x=x, y=y, hue=plan.hue, hue_order=plan.hue_order, row=plan.row,
        row_order=plan.row_order or None, col=col, col_order=col_order, kind=kind, errorbar=BAND,
        n_boot=200, seed=0, palette=PALETTE, marker="o" if x == "depth" else None, markersize=4,
        height=2.6, aspect=1.35, facet_kws={"sharex": False, "sharey": True, "margin_titles": True}, **kw)
    if logy:
        g.set(yscale="log")
    return g


def gradient_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    k = block_kernels(run.params)
    k = k[np.isfinite(k["grad_norm"]) & (k["grad_norm"] > 0)] if not k.empty else k
    if k.empty:
        return None
    data = _moments(k)
    g = _relplot(data, plan, "depth", "grad_norm", "when", ["init", "middle", "end"], logy=True)
    g.set_axis_labels("block (0 = nearest the input)", "||dL/dW|| (L2, log)")
    cols = ["arm_id", "seed", "arm", "when", "step", "depth", "layer", "grad_norm"] + ([plan.row] if plan.row else [])
    return _save(g, out, "grad_vs_depth", data[cols], "Weight-gradient norm by depth",
                 "L2 norm of each block's first kernel gradient at the first, middle and last captured step. "
                 "A line falling toward block 0 means the gradient vanishes on its way to the input; "
                 "bands: 95% CI over seeds.")


def preact_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    b = run.blocks
    if b.empty or not np.isfinite(b["act_grad_norm"]).any():
        return None
    data = _moments(b[np.isfinite(b["act_grad_norm"]) & (b["act_grad_norm"] > 0)])
    g = _relplot(data, plan, "depth", "act_grad_norm", "when", ["init", "middle", "end"], logy=True)
    g.set_axis_labels("block (0 = nearest the input)", "||dL/dz|| pre-activation (log)")
    cols = ["arm_id", "seed", "arm", "when", "step", "depth", "act_grad_norm"] + ([plan.row] if plan.row else [])
    return _save(g, out, "preact_grad_vs_depth", data[cols], "Back-propagated gradient by depth",
                 "L2 norm of dL/d(pre-activation) of each block's first linear layer (Glorot & Bengio 2010: this "
                 "shrinks toward the input even where weight gradients look flat).")


def update_ratio_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    k = block_kernels(run.params)
    if k.empty or not np.isfinite(k["update_ratio"]).any():
        return None
    data = _moments(k[np.isfinite(k["update_ratio"]) & (k["update_ratio"] > 0)])
    g = _relplot(data, plan, "depth", "update_ratio", "when", ["init", "middle", "end"], logy=True)
    for ax in g.axes.flat:
        ax.axhline(STALL_RATIO, color="0.4", ls="--", lw=1)
    g.set_axis_labels("block (0 = nearest the input)", "||update|| / ||W|| (log)")
    cols = ["arm_id", "seed", "arm", "when", "step", "depth", "update_ratio"] + ([plan.row] if plan.row else [])
    return _save(g, out, "update_ratio_vs_depth", data[cols], "Update-to-weight ratio by depth",
                 "Norm of the applied update over the weight norm, per block kernel. Below the dashed 1e-3 line "
                 "a layer is barely learning.")


def loss_curves(run: RunData, plan: Plan, out: Path) -> Figure | None:
    h = run.history
    if h.empty:
        return None
    data = h[np.isfinite(h["loss"])]
    g = sns.relplot(data=data, x="step", y="loss", hue=plan.hue, hue_order=plan.hue_order, col=plan.row,
                    col_order=plan.row_order or None, kind="line", errorbar=BAND, n_boot=200, seed=0,
                    palette=PALETTE, height=2.8, aspect=1.3, facet_kws={"sharey": True})
    g.set_axis_labels("optimizer step", "training loss (batch)")
    cols = ["arm_id", "seed", "arm", "step", "epoch", "loss"] + ([plan.row] if plan.row else [])
    return _save(g, out, "loss_curves", data[cols], "Training loss",
                 "Mini-batch training loss at every captured step; bands: 95% CI over seeds.")


def epoch_curves(run: RunData, plan: Plan, out: Path) -> Figure | None:
    e = run.epochs
    metric = "val_accuracy" if "val_accuracy" in e.columns else ("val_loss" if "val_loss" in e.columns else None)
    if e.empty or metric is None:
        return None
    data = e[np.isfinite(e[metric])]
    g = sns.relplot(data=data, x="epoch", y=metric, hue=plan.hue, hue_order=plan.hue_order, col=plan.row,
                    col_order=plan.row_order or None, kind="line", errorbar=BAND, n_boot=200, seed=0,
                    palette=PALETTE, marker="o", height=2.8, aspect=1.3)
    g.set_axis_labels("epoch", metric.replace("_", " "))
    cols = ["arm_id", "seed", "arm", "epoch", metric] + ([plan.row] if plan.row else [])
    return _save(g, out, "validation_curves", data[cols], f"Validation {metric[4:]}",
                 f"{metric.replace('_', ' ')} at the end of each epoch; bands: 95% CI over seeds.")


ALL = [gradient_vs_depth, preact_vs_depth, update_ratio_vs_depth, loss_curves, epoch_curves]


def make_figures(run: RunData, out: Path) -> list[Figure]:
    """Writes every figure the run has data for into ``out``."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plan = plan_for(run)
    figs = []
    for fn in ALL:
        fig = fn(run, plan, out)
        if fig is not None:
            figs.append(fig)
    return figs
