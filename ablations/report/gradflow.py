"""Run-level gradient-flow figures: where the gradient vanishes, by how much, and what fixed it.

Each function has the signature ``fn(run, plan, out) -> Figure | None`` and returns ``None`` when the run
lacks its data (see :mod:`ablations.report.figures` for the list they are registered in).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ablations.diagnose import block_kernels
from ablations.report.data import RunData
from ablations.report.plotting import (BAND_NOTE, SEQUENTIAL, WHENS, Figure, Plan, band, downsample_steps,
                                       facet_lines, finite, keep_cols, moments, panels, save, wants_log,
                                       with_panels)
from ablations.report.stats import arm_decay

STALL_RATIO = 1e-3  # update/weight ratio below which a layer is barely learning (LITERATURE.md 15)
SIGMOID_GAIN = 0.25  # max of sigmoid'(x): each sigmoid layer scales the back-propagated gradient by <= 1/4
MAX_HEATMAPS = 24
BLOCK_AXIS = "block (0 = nearest the input)"


def _vs_depth(run: RunData, plan: Plan, out: Path, data: pd.DataFrame, y: str, key: str, ylabel: str,
              title: str, caption: str, log: bool | None = None, hline: float | None = None,
              ylim: tuple[float, float] | None = None) -> Figure | None:
    data = finite(data, y)
    log = wants_log(data[y]) if log is None else log
    data = finite(data, y, positive=True) if log else data
    if data.empty:
        return None
    data = moments(data)
    col, col_order = with_panels(data, plan, "when", WHENS)
    agg = band(data, "depth", y, [plan.hue, plan.row, col], log)
    extra = None
    if hline is not None:
        extra = {f"ratio {hline:.0e}".replace("e-0", "e-"): Line2D([], [], color="0.35", ls="--", lw=1)}
    g = facet_lines(agg, plan, "depth", y, col=col, col_order=col_order, log=log, extra_legend=extra)
    for ax in g.axes.flat:
        if hline is not None:
            ax.axhline(hline, color="0.35", ls="--", lw=1)
        if ylim is not None:
            ax.set_ylim(*ylim)
    g.set_axis_labels(BLOCK_AXIS, ylabel)
    return save(g, out, key, keep_cols(data, plan, "when", "step", "depth", y), title, caption + " " + BAND_NOTE + ".")


def gradient_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    return _vs_depth(run, plan, out, block_kernels(run.params), "grad_norm", "grad_vs_depth",
                     "||dL/dW|| (L2 norm)", "Weight-gradient norm by depth",
                     "L2 norm of each block's first kernel gradient at the first, middle and last captured step. "
                     "A line falling toward block 0 means the gradient vanishes on its way to the input.", log=True)


def preact_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "act_grad_norm" not in run.blocks:
        return None
    return _vs_depth(run, plan, out, run.blocks, "act_grad_norm", "preact_grad_vs_depth",
                     "||dL/dz|| pre-activation (L2)", "Back-propagated gradient by depth",
                     "L2 norm of dL/d(pre-activation) of each block's first linear layer: the signal that is "
                     "multiplied by one Jacobian per layer on its way to the input (Glorot & Bengio 2010).",
                     log=True)


def update_ratio_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    return _vs_depth(run, plan, out, block_kernels(run.params), "update_ratio", "update_ratio_vs_depth",
                     "||ΔW|| / ||W|| (ratio)", "Update-to-weight ratio by depth",
                     "Norm of the update the optimizer applied over the weight norm, per block kernel. Below the "
                     "dashed 1e-3 line a layer is barely learning; a missing point is an update that changed "
                     "nothing at all (below float32 resolution).", log=True, hline=STALL_RATIO)


def saturation_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "act_saturation" not in run.blocks:
        return None
    return _vs_depth(run, plan, out, run.blocks, "act_saturation", "saturation_vs_depth",
                     "saturated entries (fraction)", "Activation saturation by depth",
                     "Fraction of activation entries whose derivative is below 5% of the activation's maximum "
                     "derivative (saturated sigmoid/tanh units, ReLU units at zero).", log=False, ylim=(-0.03, 1.03))


def dead_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "act_dead" not in run.blocks:
        return None
    return _vs_depth(run, plan, out, run.blocks, "act_dead", "dead_units_vs_depth",
                     "dead units (fraction)", "Dead units by depth",
                     "Fraction of a block's units whose activation derivative is zero for every example of the "
                     "batch (dead ReLUs pass no gradient at all).", log=False, ylim=(-0.03, 1.03))


def branch_ratio_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "branch_ratio" not in run.blocks:
        return None
    return _vs_depth(run, plan, out, run.blocks, "branch_ratio", "branch_ratio_vs_depth",
                     "||branch|| / ||skip|| (ratio)", "Residual branch against skip by depth",
                     "Norm of each residual block's branch output over the norm of its skip input at the sum. "
                     "Far below 1 the block is close to the identity (ReZero at init, scaled branches); far above "
                     "1 the branches dominate and the signal grows with depth.", log=True)


def gate_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "gate_mean" not in run.blocks:
        return None
    return _vs_depth(run, plan, out, run.blocks, "gate_mean", "gate_vs_depth", "transform gate (mean)",
                     "Highway transform gate by depth",
                     "Mean of each highway block's transform gate T(x): near 0 the block carries its input "
                     "through (Srivastava et al. 2015 start it there with a negative gate bias).", log=False,
                     ylim=(-0.03, 1.03))


def rezero_alpha_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "alpha" not in run.blocks:
        return None
    return _vs_depth(run, plan, out, run.blocks, "alpha", "rezero_alpha_vs_depth", "alpha (residual weight)",
                     "ReZero residual weights by depth",
                     "Each ReZero block's learned residual weight alpha (x + alpha * F(x)), before the step's "
                     "update: 0 at init, so every block starts as the identity (Bachlechner et al. 2020).",
                     log=False)


def survival_vs_depth(run: RunData, plan: Plan, out: Path) -> Figure | None:
    if run.blocks.empty or "active" not in run.blocks:
        return None
    b = finite(run.blocks, "active").sort_values("step")
    if b.empty:
        return None
    # Running mean over the captured steps so far: the empirical survival rate, which approaches p_l.
    b = b.assign(survival=b.groupby(["arm_id", "depth"])["active"].transform(lambda s: s.expanding().mean()))
    return _vs_depth(run, plan, out, b, "survival", "survival_vs_depth", "branch active (fraction)",
                     "Stochastic depth: how often each block was on",
                     "Fraction of the captured steps (batch mode) or examples (sample mode) for which each "
                     "block's residual branch was active, averaged from the first captured step to the one shown; "
                     "it approaches the survival probability p_l (Huang et al. 2016: linear from 1 to p_L).",
                     log=False, ylim=(-0.03, 1.03))


def _relative(df: pd.DataFrame, y: str) -> pd.DataFrame:
    """``y`` divided by its value in the arm's last block at the same step."""
    last = df.loc[df.groupby(["arm_id", "step"])["depth"].idxmax(), ["arm_id", "step", y]]
    df = df.merge(last.rename(columns={y: "_last"}), on=["arm_id", "step"])
    return df.assign(relative=df[y] / df["_last"]).drop(columns="_last")


def sigmoid_theory(run: RunData, plan: Plan, out: Path) -> Figure | None:
    """Gradient relative to the last block at init, with the sigmoid bound 0.25^(L-1-i) dashed."""
    sigmoid = {s["arm_id"] for s in run.summaries if run.activation(s["arm_id"]) == "sigmoid"}
    if not sigmoid:
        return None
    parts = []
    k = finite(block_kernels(run.params), "grad_norm", positive=True)
    if not k.empty:
        parts.append(_relative(k[k["step"] == k.groupby("arm_id")["step"].transform("min")], "grad_norm")
                     .assign(quantity="weight gradient ||dL/dW||"))
    b = finite(run.blocks, "act_grad_norm", positive=True) if "act_grad_norm" in run.blocks else run.blocks.iloc[0:0]
    if not b.empty:
        parts.append(_relative(b[b["step"] == b.groupby("arm_id")["step"].transform("min")], "act_grad_norm")
                     .assign(quantity="pre-activation gradient ||dL/dz||"))
    if not parts:
        return None
    data = finite(pd.concat(parts, ignore_index=True), "relative", positive=True)
    quantities = list(dict.fromkeys(data["quantity"]))
    col, col_order = with_panels(data, plan, "quantity", quantities)
    agg = band(data, "depth", "relative", [plan.hue, plan.row, col], log=True)
    g = facet_lines(agg, plan, "depth", "relative", col=col, col_order=col_order, log=True,
                    extra_legend={"sigmoid bound 0.25^(L-1-i)": Line2D([], [], color="black", ls="--", lw=1.2)})
    theory = []
    for ax, sel in panels(g, data, plan.row, col):
        if sel.empty:
            continue
        depth = int(sel["depth"].max()) + 1
        d = np.arange(depth)
        ax.plot(d, SIGMOID_GAIN ** (depth - 1 - d), color="black", ls="--", lw=1.2)
        theory.append(pd.DataFrame({"arm_id": "theory: sigmoid 0.25^(L-1-i)", "depth": d,
                                    "relative": SIGMOID_GAIN ** (depth - 1 - d), "quantity": sel["quantity"].iloc[0],
                                    "network_depth": depth}))
    g.set_axis_labels(BLOCK_AXIS, "relative to the last block")
    csv = pd.concat([keep_cols(data, plan, "quantity", "step", "depth", "relative")] + theory, ignore_index=True)
    return save(g, out, "sigmoid_theory", csv, "Gradient relative to the last block at init, with the sigmoid bound",
                "Each block's gradient norm at the first captured step divided by that of the last block. "
                "Dashed: 0.25^(L-1-i), the attenuation when every layer between block i and the last multiplies "
                "the back-propagated gradient by sigmoid's maximum derivative 1/4 through weights of unit gain "
                "(Glorot & Bengio 2010). Sigmoid arms that follow the dashed line lose a factor 4 per layer. "
                + BAND_NOTE + ".")


def gradient_heatmaps(run: RunData, plan: Plan, out: Path) -> Figure | None:
    """Layer x step heatmaps of log10 kernel-gradient norm, one panel per grid point (first seed)."""
    k = finite(block_kernels(run.params), "grad_norm", positive=True)
    if k.empty:
        return None
    first_seed = {}
    for s in run.summaries:  # one arm per grid point: the first seed, in sweep order
        key = (plan.labels[s["arm_id"]], str(plan.rows[s["arm_id"]]), plan.cols[s["arm_id"]])
        first_seed.setdefault(key, s["arm_id"])
    arms = [a for a in first_seed.values() if (k["arm_id"] == a).any()]
    shown, omitted = arms[:MAX_HEATMAPS], len(arms) - MAX_HEATMAPS
    k = downsample_steps(k[k["arm_id"].isin(shown)], 150)
    k = k.assign(log10_grad_norm=np.log10(k["grad_norm"]))
    cells = k.groupby(["arm_id", "depth", "step"], sort=False)["log10_grad_norm"].mean().reset_index()
    lo, hi = np.nanpercentile(cells["log10_grad_norm"], [1, 99])
    ncol = min(4, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.2 * nrow + 0.4), squeeze=False, sharex=False)
    mesh = None
    for ax, arm in zip(axes.flat, shown):
        c = cells[cells["arm_id"] == arm].pivot(index="depth", columns="step", values="log10_grad_norm")
        steps, depths = c.columns.to_numpy(), c.index.to_numpy()
        xe = np.append(steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))
        ye = np.append(depths, depths[-1] + 1) - 0.5
        mesh = ax.pcolormesh(xe, ye, c.to_numpy(), cmap=SEQUENTIAL, vmin=lo, vmax=hi, shading="flat")
        status = next(s.get("status") for s in run.summaries if s["arm_id"] == arm)
        ax.set_title(plan.short[arm] + ("" if status == "completed" else f" ({status})"), fontsize=9)
        ax.tick_params(labelsize=7)
        ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax in axes[-1, :]:
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("block", fontsize=8)
    fig.tight_layout()
    cbar = fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
    cbar.set_label("log10 ||dL/dW|| (L2 norm)")
    note = f" {omitted} more grid points are not shown." if omitted > 0 else ""
    csv = cells.merge(k[["arm_id", "arm"]].drop_duplicates(), on="arm_id")
    return save(fig, out, "grad_heatmaps", csv, "Weight-gradient norm over depth and time",
                "log10 of each block kernel's gradient norm (colour) by block (rows, 0 = nearest the input) and "
                "optimizer step (columns), one panel per grid point (first seed; titles list its values of "
                f"{', '.join(run.axes)}), one colour scale for all "
                f"panels (1st to 99th percentile). Dark rows at the bottom: gradient vanishing toward the input."
                f"{note}")


def decay_rate_summary(run: RunData, plan: Plan, out: Path) -> Figure | None:
    """Decay rate (decades per block) at init and end: one number per arm that ranks architectures."""
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
    return save(g, out, "decay_rate", data.drop(columns=["x"]), "Gradient decay rate",
                "Least-squares slope of log10(block kernel-gradient norm) against block depth at the first (init) "
                "and last (end) captured step: decades lost per block toward the input. 0 is ideal; 0.6 is a "
                "factor 4 per block (log10 4 = 0.6); negative values mean the gradient grows toward the input. "
                + BAND_NOTE + ".")


def time_lag(run: RunData, plan: Plan, out: Path) -> Figure | None:
    """Recurrent layers: dL/dh_t against the time lag to the loss (log y)."""
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
    return save(g, out, "grad_vs_time_lag", keep_cols(data, plan, "when", "step", "layer", "t", "lag", "act_grad_norm"),
                "Gradient through time",
                "L2 norm of dL/dh_t of each recurrent layer against the lag between step t and the end of the "
                "sequence: a line falling to the right means the gradient vanishes through time (Pascanu et al. "
                "2013). " + BAND_NOTE + ".")
