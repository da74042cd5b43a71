"""Input-output Jacobian spectra at init across arms (``capture.instruments.jacobian``): dynamical isometry.

Pennington, Schoenholz & Ganguli 2017: the mean squared singular value of J (its gain) and the variance of the
eigenvalues of J J^T against network depth, the distribution of singular values at the deepest depth, and
each block's mean squared singular value (where the spectrum spreads), all at init.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import BLOCK_AXIS, Plan, Plot, subplots

FLOOR = 1e-12  # zero variances (an exact isometry) drawn at this floor on the log axis


def _at_init(df: pd.DataFrame) -> pd.DataFrame:
    """Each arm's first snapshot (``when`` = init where the arm has one)."""
    if df.empty:
        return df
    first = df.groupby("arm_id")["step"].transform("min")
    return df[df["step"] == first]


@figure(key="jacobian_spectra", section="Dynamical isometry", order=180, needs=("jacobian:rel_var_sq",))
def jacobian_spectra(run: RunData, plan: Plan) -> Plot | None:
    main = _at_init(run.table("jacobian"))
    if main.empty:
        return None
    blocks = {s["arm_id"]: s.get("n_blocks") for s in run.summaries}
    main = main.assign(network_depth=main["arm_id"].map(blocks)).dropna(subset=["network_depth"])
    per_arm = (main.groupby(["arm_id", "arm", "network_depth"], as_index=False, sort=False)
               [["mean_sq", "var_sq", "rel_var_sq", "sv_max", "sv_min"]].mean())
    fig, axes = subplots(1, 4, figsize=(17.0, 3.6))
    sv, gains = _at_init(run.table("jacobian_sv")), _at_init(run.table("jacobian_blocks"))
    for label in [h for h in plan.hue_order if h in set(per_arm["arm"])]:
        _draw_arm(axes, per_arm[per_arm["arm"] == label], sv, gains, label, plan.palette.get(label))
    _label_axes(axes)
    fig.tight_layout()
    return Plot(fig, per_arm.assign(when="init"), "Input-output Jacobian spectra at init",
                "Singular values of the Jacobian from the first block's input to the last block's output, on the "
                "fixed examples of capture.instruments.jacobian, before training. Left: its gain (mean squared "
                "singular value) and the variance of the eigenvalues of J J^T against depth, mean over examples "
                f"(a zero variance, exact isometry, drawn at {FLOOR:g}); a deep linear net with orthogonal weights "
                "keeps every singular value at 1, a Gaussian ReLU net at sigma_w^2 = 2 keeps the gain but its "
                "spread grows with depth (Pennington, Schoenholz & Ganguli 2017). Third: the distribution of the "
                "singular values at the deepest depth (all examples); right: each block's own mean squared "
                "singular value, the block Jacobians whose product is J.")


def _draw_arm(axes: Any, arms: pd.DataFrame, sv: pd.DataFrame, gains: pd.DataFrame, label: str,
              colour: Any) -> None:
    """One hue: gain and spread against depth, the singular values' distribution and the block gains at the
    deepest depth."""
    d = arms.groupby("network_depth", as_index=False)[["mean_sq", "var_sq"]].mean().sort_values("network_depth")
    axes[0].plot(d["network_depth"], d["mean_sq"], "o-", color=colour, label=label)
    axes[1].plot(d["network_depth"], np.maximum(d["var_sq"], FLOOR), "o-", color=colour, label=label)
    top = arms["network_depth"].max()
    deepest = arms.loc[arms["network_depth"] == top, "arm_id"].tolist()
    s = np.sort(sv.loc[sv["arm_id"].isin(deepest), "singular_value"].to_numpy(dtype=float)) if not sv.empty else []
    if len(s):
        axes[2].plot(s, np.arange(1, len(s) + 1) / len(s), color=colour, drawstyle="steps-post",
                     label=f"{label} (depth {int(top)})")
    g = gains[gains["arm_id"].isin(deepest[:1])].sort_values("depth") if not gains.empty else gains
    if not g.empty:
        axes[3].plot(g["depth"], g["mean_sq"], color=colour, label=label)


def _label_axes(axes: Any) -> None:
    for ax, title, ylabel in ((axes[0], "gain: mean squared singular value", "mean of sigma^2 (log)"),
                              (axes[1], "spread: variance of the eigenvalues of J J^T", "var of sigma^2 (log)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("network depth (blocks)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("singular value of J (log)")
    axes[2].set_ylabel("fraction of singular values <= x")
    axes[2].set_title("singular values at the deepest depth", fontsize=9)
    axes[3].set_yscale("log")
    axes[3].set_xlabel(BLOCK_AXIS)
    axes[3].set_ylabel("block's mean sigma^2 (log)")
    axes[3].set_title("per block, deepest depth", fontsize=9)
    axes[2].legend(fontsize=7, loc="upper left")
    axes[0].legend(fontsize=7, loc="best")
