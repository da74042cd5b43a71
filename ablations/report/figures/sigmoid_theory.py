"""Gradient relative to the last block at init, with the sigmoid attenuation bound dashed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ablations.diagnose import block_kernels
from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import (BAND_NOTE, BLOCK_AXIS, Plan, Plot, band, facet_lines, finite, keep_cols,
                                       panels, with_panels)
from ablations.theory import attenuation_bound, max_derivative

BOUND = f"{max_derivative('sigmoid'):g}^(L-1-i)"  # "0.25^(L-1-i)"


def _relative(df: pd.DataFrame, y: str) -> pd.DataFrame:
    """``y`` divided by its value in the arm's last block at the same step."""
    last = df.loc[df.groupby(["arm_id", "step"])["depth"].idxmax(), ["arm_id", "step", y]]
    df = df.merge(last.rename(columns={y: "_last"}), on=["arm_id", "step"])
    return df.assign(relative=df[y] / df["_last"]).drop(columns="_last")


def _first_step(df: pd.DataFrame, y: str, quantity: str) -> pd.DataFrame:
    return _relative(df[df["step"] == df.groupby("arm_id")["step"].transform("min")], y).assign(quantity=quantity)


@figure(key="sigmoid_theory", section="Gradient flow", order=40,
        needs=("params:grad_norm | blocks:act_grad_norm",))
def sigmoid_theory(run: RunData, plan: Plan) -> Plot | None:
    """Only for runs with sigmoid arms; one panel per gradient kind (weights, pre-activations)."""
    if not any(run.activation(s["arm_id"]) == "sigmoid" for s in run.summaries):
        return None
    parts = []
    k = finite(block_kernels(run.params), "grad_norm", positive=True)
    if not k.empty:
        parts.append(_first_step(k, "grad_norm", "weight gradient ||dL/dW||"))
    b = finite(run.blocks, "act_grad_norm", positive=True) if "act_grad_norm" in run.blocks else run.blocks.iloc[0:0]
    if not b.empty:
        parts.append(_first_step(b, "act_grad_norm", "pre-activation gradient ||dL/dz||"))
    if not parts:
        return None
    data = finite(pd.concat(parts, ignore_index=True), "relative", positive=True)
    quantities = list(dict.fromkeys(data["quantity"]))
    col, col_order = with_panels(data, plan, "quantity", quantities)
    agg = band(data, "depth", "relative", [plan.hue, plan.row, col], log=True)
    g = facet_lines(agg, plan, "depth", "relative", col=col, col_order=col_order, log=True,
                    extra_legend={f"sigmoid bound {BOUND}": Line2D([], [], color="black", ls="--", lw=1.2)})
    theory = []
    for ax, sel in panels(g, data, plan.row, col):
        if sel.empty:
            continue
        depth = int(sel["depth"].max()) + 1
        d = np.arange(depth)
        bound = attenuation_bound("sigmoid", depth - 1 - d)
        ax.plot(d, bound, color="black", ls="--", lw=1.2)
        theory.append(pd.DataFrame({"arm_id": f"theory: sigmoid {BOUND}", "depth": d, "relative": bound,
                                    "quantity": sel["quantity"].iloc[0], "network_depth": depth}))
    g.set_axis_labels(BLOCK_AXIS, "relative to the last block")
    csv = pd.concat([keep_cols(data, plan, "quantity", "step", "depth", "relative")] + theory, ignore_index=True)
    return Plot(g, csv, "Gradient relative to the last block at init, with the sigmoid bound",
                "Each block's gradient norm at the first captured step divided by that of the last block. "
                f"Dashed: {BOUND}, the attenuation when every layer between block i and the last multiplies "
                "the back-propagated gradient by sigmoid's maximum derivative 1/4 through weights of unit gain "
                "(Glorot & Bengio 2010). Sigmoid arms that follow the dashed line lose a factor 4 per layer. "
                + BAND_NOTE + ".")
