"""Per-arm drill-down figures (one page per arm): plain matplotlib, small, one arm's data only.

Each function has the signature ``fn(arm: ArmView, out: Path) -> Figure | None`` and returns ``None``
when the arm lacks the data; they are registered in :data:`ablations.report.figures.ARM_FIGURES`.
Snapshots of a profile (gradient vs depth at several steps) are coloured by step with a sequential
colour-blind-safe map (viridis: dark = early, yellow = late).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator, NullLocator

from ablations.diagnose import block_kernels
from ablations.report.data import TABLES, RunData
from ablations.report.plotting import DPI, SEQUENTIAL, Figure, Plan, downsample_steps, finite, wants_log

SNAPSHOTS = 5
STALL_RATIO = 1e-3
SIGMOID_GAIN = 0.25


@dataclasses.dataclass
class ArmView:
    """One arm's summary, label and tables (rows of that arm only)."""

    arm_id: str
    summary: dict[str, Any]
    label: str
    activation: str | None
    tables: dict[str, pd.DataFrame]
    error: str | None = None

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)


def arm_views(run: RunData, plan: Plan) -> list[ArmView]:
    """Splits the run's tables by arm once (not one filter per arm and table)."""
    split = {t: dict(tuple(run.table(t).groupby("arm_id", sort=False))) if not run.table(t).empty else {}
             for t in TABLES}
    return [ArmView(arm_id=s["arm_id"], summary=s, label=plan.labels.get(s["arm_id"], ""),
                    activation=run.activation(s["arm_id"]), error=run.errors.get(s["arm_id"]),
                    tables={t: split[t].get(s["arm_id"], pd.DataFrame()) for t in TABLES})
            for s in run.summaries]


def _save(fig: Any, out: Path, key: str, data: pd.DataFrame, title: str, caption: str, right: float = 0.2) -> Figure:
    # Fixed margins instead of constrained layout or a tight bounding box: the layout engines measure every
    # tick label again and cost more than the drawing itself (most of a 50-arm report's time).
    for ax in fig.axes:  # every tick is a few artists: fewer ticks, faster drawing (most of a report's time)
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log" and lo > 0 and hi / lo > 1e3:
            ax.yaxis.set_minor_locator(NullLocator())
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), MaxNLocator):
                axis.get_major_locator().set_params(nbins=5)
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=1.0 / w, right=1 - right / w, bottom=0.6 / h, top=1 - 0.5 / h, wspace=0.5)
    fig.suptitle(title, fontsize=11)
    fig.savefig(out / f"{key}.png", dpi=DPI)
    data.to_csv(out / f"{key}.csv", index=False)
    return Figure(key=key, title=title, png=f"{key}.png", csv=f"{key}.csv", caption=caption)


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[MplFigure, Any]:
    """Like ``plt.subplots`` without pyplot's figure manager (nothing to close, less work per figure)."""
    fig = MplFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _snapshots(df: pd.DataFrame) -> list[int]:
    steps = np.sort(df["step"].unique())
    idx = np.unique(np.linspace(0, len(steps) - 1, min(SNAPSHOTS, len(steps))).round().astype(int))
    return [int(steps[i]) for i in idx]


def _profiles(ax: Any, df: pd.DataFrame, y: str, steps: list[int], log: bool) -> None:
    cmap = plt.get_cmap(SEQUENTIAL)
    for i, st in enumerate(steps):
        d = df[df["step"] == st].sort_values("depth")
        ax.plot(d["depth"], d[y], marker="o", ms=3, lw=1.5, color=cmap(i / max(1, len(steps) - 1) * 0.9),
                label=f"step {st}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("block (0 = nearest the input)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def arm_gradients(arm: ArmView, out: Path) -> Figure | None:
    k = finite(block_kernels(arm.params), "grad_norm", positive=True) if not arm.params.empty else pd.DataFrame()
    b = finite(arm.blocks, "act_grad_norm", positive=True) if "act_grad_norm" in arm.blocks else pd.DataFrame()
    panels = [(d, y, lab) for d, y, lab in ((k, "grad_norm", "||dL/dW|| block kernel (L2)"),
                                            (b, "act_grad_norm", "||dL/dz|| pre-activation (L2)")) if not d.empty]
    if not panels:
        return None
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    rows = []
    for ax, (d, y, lab) in zip(axes.flat, panels):
        steps = _snapshots(d)
        _profiles(ax, d, y, steps, log=True)
        ax.set_ylabel(lab)
        if arm.activation == "sigmoid":
            init = d[d["step"] == steps[0]].sort_values("depth")
            depth, last = int(init["depth"].max()) + 1, float(init[y].iloc[-1])
            dd = np.arange(depth)
            ax.plot(dd, last * SIGMOID_GAIN ** (depth - 1 - dd), "k--", lw=1, label="0.25^(L-1-i) x last")
        rows.append(d[d["step"].isin(steps)][["step", "depth", y]].assign(quantity=y))
    axes.flat[0].legend(fontsize=7)
    return _save(fig, out, "gradients", pd.concat(rows, ignore_index=True), "Gradient norm by depth",
                 "Block kernel-gradient norm and back-propagated dL/d(pre-activation) norm against depth at evenly "
                 "spaced captured steps (dark: early, yellow: late)."
                 + (" Dashed: the sigmoid bound 0.25^(L-1-i) relative to the last block at the first step."
                    if arm.activation == "sigmoid" else ""))


def _heat(ax: Any, fig: Any, df: pd.DataFrame, y: str, label: str) -> pd.DataFrame:
    d = downsample_steps(df, 150)
    cells = d.assign(v=np.log10(d[y])).groupby(["depth", "step"])["v"].mean().reset_index()
    _depth_mesh(ax, fig, cells.pivot(index="depth", columns="step", values="v"), f"log10 {label}", "optimizer step",
                last_width=1)
    return cells.rename(columns={"v": f"log10_{y}"})


def _depth_mesh(ax: Any, fig: Any, c: pd.DataFrame, label: str, xlabel: str, last_width: float, **kw: Any) -> None:
    """A block-by-x colour mesh of ``c`` (index: depth, columns: x), each cell spanning to the next column."""
    xs, depths = c.columns.to_numpy(), c.index.to_numpy()
    xe = np.append(xs, xs[-1] + (xs[-1] - xs[-2] if len(xs) > 1 else last_width))
    ye = np.append(depths, depths[-1] + 1) - 0.5
    mesh = ax.pcolormesh(xe, ye, c.to_numpy(), cmap=SEQUENTIAL, shading="flat", **kw)
    fig.colorbar(mesh, ax=ax, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("block")
    ax.yaxis.get_major_locator().set_params(integer=True)


def arm_heatmaps(arm: ArmView, out: Path) -> Figure | None:
    k = finite(block_kernels(arm.params), "grad_norm", positive=True) if not arm.params.empty else pd.DataFrame()
    b = finite(arm.blocks, "act_grad_norm", positive=True) if "act_grad_norm" in arm.blocks else pd.DataFrame()
    panels = [(d, y, lab) for d, y, lab in ((k, "grad_norm", "||dL/dW||"), (b, "act_grad_norm", "||dL/dz||"))
              if not d.empty]
    if not panels:
        return None
    fig, axes = _subplots(1, len(panels), figsize=(4.6 * len(panels), 3.2), squeeze=False)
    parts = [_heat(ax, fig, d, y, lab) for ax, (d, y, lab) in zip(axes.flat, panels)]
    data = parts[0] if len(parts) == 1 else parts[0].merge(parts[1], on=["depth", "step"], how="outer")
    return _save(fig, out, "heatmaps", data, "Gradient norm over depth and time",
                 "log10 of the block kernel-gradient norm (left) and of the pre-activation gradient norm (right), "
                 "by block and optimizer step (steps binned for long runs).", right=0.75)


def arm_grad_hist(arm: ArmView, out: Path) -> Figure | None:
    """Distribution of log10|dL/dW| per block at the first and last captured step (capture.histograms)."""
    h = arm.grad_hist if "grad_hist" in arm.tables else pd.DataFrame()
    if h.empty:
        return None
    h = h[h["bin"] >= 0]
    steps = sorted({int(h["step"].min()), int(h["step"].max())})
    fig, axes = _subplots(1, len(steps), figsize=(4.6 * len(steps), 3.2), squeeze=False)
    for ax, step in zip(axes.flat, steps):
        c = h[h["step"] == step].pivot(index="depth", columns="log10_lo", values="fraction")
        _depth_mesh(ax, fig, c, "fraction of entries", "log10 |dL/dW|", last_width=math.log10(2.0), vmin=0)
        ax.set_title(f"step {step}", fontsize=9)
    data = h[h["step"].isin(steps)][["step", "depth", "bin", "log10_lo", "log10_hi", "count", "fraction"]]
    return _save(fig, out, "grad_hist", data, "Gradient distribution by depth",
                 "Fraction of each block's kernel-gradient entries per factor-2 bin of |dL/dW| (capture.histograms), "
                 "at the first and last captured step; exact zeros are counted apart (bin -1 in the CSV). A "
                 "vanishing gradient is a mass sliding left toward block 0, not just a smaller norm.", right=0.75)


def arm_updates(arm: ArmView, out: Path) -> Figure | None:
    """Update ratio, saturation and dead units against depth (one figure: what each block is doing)."""
    k = finite(block_kernels(arm.params), "update_ratio", positive=True) if not arm.params.empty else pd.DataFrame()
    b = arm.blocks
    cols = [(c, lab) for c, lab in (("act_saturation", "saturated entries (fraction)"),
                                    ("act_dead", "dead units (fraction)")) if c in b and np.isfinite(b[c]).any()]
    n = int(not k.empty) + len(cols)
    if n == 0:
        return None
    fig, axes = _subplots(1, n, figsize=(4.0 * n, 3.3), squeeze=False)
    axes = list(axes.flat)
    data = []
    if not k.empty:
        ax = axes.pop(0)
        steps = _snapshots(k)
        _profiles(ax, k, "update_ratio", steps, log=True)
        ax.axhline(STALL_RATIO, color="0.35", ls="--", lw=1, label="1e-3")
        ax.set_ylabel("||ΔW|| / ||W|| (ratio)")
        ax.legend(fontsize=7)
        data.append(k[k["step"].isin(steps)][["step", "depth", "update_ratio"]])
    if cols:
        steps = _snapshots(b)
        for ax, (c, lab) in zip(axes, cols):
            _profiles(ax, finite(b, c), c, steps, log=False)
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(lab)
        if k.empty:
            axes[0].legend(fontsize=7)
        data.append(b[b["step"].isin(steps)][["step", "depth"] + [c for c, _ in cols]])
    merged = data[0] if len(data) == 1 else data[0].merge(data[1], on=["step", "depth"], how="outer")
    return _save(fig, out, "updates_activations", merged, "Updates and activations by depth",
                 "Left: applied update norm over weight norm per block kernel; below the dashed 1e-3 line a layer is "
                 "barely learning. Then: share of activation entries with a derivative below 5% of the maximum "
                 "(saturated), and of units whose derivative is zero for the whole batch (dead), at evenly spaced "
                 "captured steps (dark: early, yellow: late).")


def arm_training(arm: ArmView, out: Path) -> Figure | None:
    h, e = arm.history, arm.epochs
    panels = []
    if "loss" in h and np.isfinite(h["loss"]).any():
        panels.append("step")
    if "loss" in e and np.isfinite(e["loss"]).any():
        panels.append("loss")
    if "accuracy" in e and np.isfinite(e["accuracy"]).any():
        panels.append("accuracy")
    if "global_grad_norm" in h and np.isfinite(h["global_grad_norm"]).any():
        panels.append("grad")
    if not panels:
        return None
    fig, axes = _subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    data = []
    for ax, p in zip(axes.flat, panels):
        ax.grid(alpha=0.3)
        if p in ("step", "grad"):
            col = "loss" if p == "step" else "global_grad_norm"
            d = finite(h, col)
            ax.plot(d["step"], d[col], lw=1.2, color="C0")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss (batch)" if p == "step" else "||g|| all parameters (L2)")
            if wants_log(d[col]):
                ax.set_yscale("log")
            data.append(d[["step", "epoch", col]].rename(columns={col: "value"}).assign(series=col))
        else:
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
    return _save(fig, out, "training", pd.concat(data, ignore_index=True), "Training curves",
                 "Mini-batch loss per step, epoch loss and accuracy (solid: training split, dashed: validation), and "
                 "the global gradient norm over all parameters per step.")


def arm_time_lag(arm: ArmView, out: Path) -> Figure | None:
    t = arm.time_grads
    if t.empty or "act_grad_norm" not in t:
        return None
    t = finite(t, "act_grad_norm", positive=True)
    if t.empty:
        return None
    t = t.assign(lag=t.groupby(["step", "layer"])["t"].transform("max") - t["t"])
    layers = list(dict.fromkeys(t["layer"]))
    fig, axes = _subplots(1, len(layers), figsize=(4.2 * len(layers), 3.3), squeeze=False)
    steps = _snapshots(t)
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
    return _save(fig, out, "time_lag", t[t["step"].isin(steps)][["step", "layer", "t", "lag", "act_grad_norm"]],
                 "Gradient through time", "dL/dh_t of each recurrent layer against the lag to the last time step, at "
                 "evenly spaced captured steps.")
