"""Sequence-model figures: LSTM/GRU gate saturation and transformer gradients by sub-layer (Pre vs Post-LN).

Both read only stored tables: ``gates.parquet`` (written by the runner for LSTM/GRU arms) and
``params.parquet`` (a transformer block's attention is ``block_<i>_attn``, its FFN ``block_<i>_linear``/
``linear2``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from ablations.report.data import RunData
from ablations.report.plotting import Figure, Plan, save


def _gates(run: RunData, plan: Plan) -> pd.DataFrame:
    df = run.table("gates")
    if df.empty:
        return df
    df = df.copy()
    df["arm"] = df["arm_id"].map(plan.labels).fillna(df["arm_id"])
    return df


def gate_saturation(run: RunData, plan: Plan, out: Path) -> Figure | None:
    """Mean gate value and the share of saturated gate entries (< 0.05 or > 0.95), at init and at the end."""
    df = _gates(run, plan)
    if df.empty:
        return None
    long = df.melt(id_vars=["arm_id", "seed", "arm", "layer", "depth", "gate", "when"],
                   value_vars=["mean", "frac_low", "frac_high"], var_name="statistic", value_name="value")
    long["statistic"] = long["statistic"].map({"mean": "mean gate value", "frac_low": "share < 0.05 (shut)",
                                               "frac_high": "share > 0.95 (open)"})
    g = sns.catplot(data=long, x="gate", y="value", hue="arm", hue_order=[h for h in plan.hue_order
                                                                          if h in set(long["arm"])],
                    col="statistic", row="when", row_order=["init", "end"], kind="bar", errorbar=("pi", 100),
                    palette=plan.palette, height=2.6, aspect=1.3)
    g.set(ylim=(0, 1))
    g.set_titles("{row_name}: {col_name}", size=9)
    g.set_axis_labels("gate", "")
    return save(g, out, "gate_saturation", long, "LSTM/GRU gates",
                "Mean value of each gate over a training batch (examples x steps x units, all recurrent layers) "
                "and the share of entries saturated shut (< 0.05) or open (> 0.95), at init and after training. "
                "An LSTM forget gate near 1 carries the gradient across long lags (Gers et al. 2000).",
                section="Sequence models")


def transformer_sublayers(run: RunData, plan: Plan, out: Path) -> Figure | None:
    """Weight-gradient norm by layer index, attention and FFN apart, at the first and last captured step."""
    p = run.params
    if p.empty or not p["layer"].str.endswith("_attn").any():
        return None
    kind = np.where(p["layer"].str.endswith("_attn"), "attention",
                    np.where(p["layer"].str.endswith("_linear") | p["layer"].str.endswith("_linear2"), "FFN", ""))
    k = p[(kind != "") & p["param"].str.endswith("kernel") & (p["role"] == "block")].assign(sublayer=kind[
        (kind != "") & p["param"].str.endswith("kernel").to_numpy() & (p["role"] == "block").to_numpy()])
    k = k[np.isfinite(k["grad_norm"]) & (k["grad_norm"] > 0)]
    if k.empty:
        return None
    # One norm per (block, sub-layer): the L2 norm over its kernels.
    agg = k.groupby(["arm_id", "seed", "arm", "step", "depth", "sublayer"], as_index=False)["grad_norm"].agg(
        lambda v: float(np.sqrt(np.sum(np.square(v)))))
    first = agg.groupby("arm_id")["step"].transform("min")
    last = agg.groupby("arm_id")["step"].transform("max")
    agg = pd.concat([agg[agg["step"] == first].assign(when="init"), agg[agg["step"] == last].assign(when="end")])
    if plan.row and plan.row in run.params:
        agg[plan.row] = agg["arm_id"].map(run.params.drop_duplicates("arm_id").set_index("arm_id")[plan.row])
    g = sns.relplot(data=agg, x="depth", y="grad_norm", hue="arm",
                    hue_order=[h for h in plan.hue_order if h in set(agg["arm"])], style="sublayer",
                    col="when", col_order=["init", "end"], row=plan.row if plan.row in agg else None,
                    kind="line", marker="o", errorbar=("pi", 100), palette=plan.palette, height=2.8, aspect=1.3,
                    facet_kws={"sharex": False})
    g.set(yscale="log")
    g.set_titles(size=9)
    g.set_axis_labels("layer (0 = nearest the input)", "||dL/dW|| (log)")
    return save(g, out, "transformer_sublayers", agg, "Transformer gradients by sub-layer",
                "Weight-gradient norm of each layer's attention (query/key/value/output kernels) and FFN kernels by "
                "layer index, at the first and last captured step. Xiong et al. 2020: at init it grows with the "
                "layer index under Post-LN and stays flat under Pre-LN.", section="Sequence models")
