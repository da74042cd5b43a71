"""LSTM/GRU gates: mean value and saturated share of each gate, at init and at the end (``gates`` table)."""

from __future__ import annotations

import seaborn as sns

from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot


@figure(key="gate_saturation", section="Sequence models", order=140,
        needs=("gates:mean", "gates:frac_low", "gates:frac_high"))
def gate_saturation(run: RunData, plan: Plan) -> Plot | None:
    """Mean gate value and the share of saturated gate entries (< 0.05 or > 0.95), at init and at the end."""
    df = run.gates
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
    return Plot(g, long, "LSTM/GRU gates",
                "Mean value of each gate over a training batch (examples x steps x units, all recurrent layers) "
                "and the share of entries saturated shut (< 0.05) or open (> 0.95), at init and after training. "
                "An LSTM forget gate near 1 carries the gradient across long lags (Gers et al. 2000).")
