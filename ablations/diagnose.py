"""Plain-language summaries of gradient flow, computed from the stored tables (no TensorFlow)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def block_kernels(params: pd.DataFrame) -> pd.DataFrame:
    """Rows of each block's first linear kernel (the per-block weight-gradient series)."""
    if params.empty:
        return params
    return params[(params["role"] == "block") & (params["param"] == "kernel")
                  & (params["layer"] == params["block"] + "_linear")]


def first_last_ratio(params: pd.DataFrame, step: int) -> float:
    """Kernel gradient norm of the first block divided by that of the last block at ``step`` (NaN if n/a)."""
    k = block_kernels(params)
    k = k[k["step"] == step].sort_values("depth")
    if len(k) < 2:
        return math.nan
    first, last = float(k["grad_norm"].iloc[0]), float(k["grad_norm"].iloc[-1])
    return first / last if last > 0 else math.nan


def gradient_summary(params: pd.DataFrame) -> dict[str, Any]:
    """First/last-block gradient ratios at the first and last captured steps."""
    if params.empty:
        return {"ratio_init": math.nan, "ratio_final": math.nan}
    steps = np.sort(params["step"].unique())
    return {"ratio_init": first_last_ratio(params, int(steps[0])),
            "ratio_final": first_last_ratio(params, int(steps[-1]))}
