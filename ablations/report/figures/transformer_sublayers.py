"""Transformer gradients by sub-layer (Pre- vs Post-LN): a block's attention is ``block_<i>_attn``, its FFN
``block_<i>_linear``/``linear2`` (``params`` table)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot


def _sublayer_norms(p: pd.DataFrame) -> pd.DataFrame:
    """One norm per (arm, step, block, sub-layer): the L2 norm over its block kernels' gradient norms."""
    kind = np.where(p["layer"].str.endswith("_attn"), "attention",
                    np.where(p["layer"].str.endswith("_linear") | p["layer"].str.endswith("_linear2"), "FFN", ""))
    k = p[(kind != "") & p["param"].str.endswith("kernel") & (p["role"] == "block")].assign(sublayer=kind[
        (kind != "") & p["param"].str.endswith("kernel").to_numpy() & (p["role"] == "block").to_numpy()])
    k = k[np.isfinite(k["grad_norm"]) & (k["grad_norm"] > 0)]
    return k.groupby(["arm_id", "seed", "arm", "step", "depth", "sublayer"], as_index=False)["grad_norm"].agg(
        lambda v: float(np.sqrt(np.sum(np.square(v)))))


@figure(key="transformer_sublayers", section="Sequence models", order=150, needs=("params:grad_norm",))
def transformer_sublayers(run: RunData, plan: Plan) -> Plot | None:
    """Weight-gradient norm by layer index, attention and FFN apart, at the first and last captured step."""
    p = run.params
    if p.empty or not p["layer"].str.endswith("_attn").any():
        return None
    agg = _sublayer_norms(p)
    if agg.empty:
        return None
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
    return Plot(g, agg, "Transformer gradients by sub-layer",
                "Weight-gradient norm of each layer's attention (query/key/value/output kernels) and FFN kernels by "
                "layer index, at the first and last captured step. Xiong et al. 2020: at init it grows with the "
                "layer index under Post-LN and stays flat under Pre-LN.")
