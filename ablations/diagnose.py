"""Verdicts: plain-language diagnoses of gradient flow, computed from the stored tables (no TensorFlow).

Each verdict names the blocks and the evidence, e.g. ``"blocks 0-11: update ratio 2e-05..4e-04 < 1e-3 over
the last 200 steps"``. Thresholds (all overridable under ``diagnose:`` in the YAML):

* vanishing: first/last block kernel-gradient ratio < 1e-3 (AUTOTRAINER, Zhang et al. 2021), or a block's
  gradient norm below an absolute floor of 1e-8;
* exploding: first/last ratio > 70 (AUTOTRAINER) or any non-finite gradient/loss;
* stalled: update/weight ratio < 1e-3 (the seed's rule: below it a layer is barely learning);
* saturated: more than 80% of a block's activation entries have a derivative < 5% of the maximum
  (Glorot & Bengio 2010's saturated sigmoid units; our threshold);
* dead units: more than 40% of a block's units have zero derivative for the whole batch (our threshold);
* plateau: the mean training loss of the last window improved by less than 1% over the window before.

The gradient-decay rate is the least-squares slope of log10(block kernel gradient norm) against block depth:
decades per block, positive when the gradient shrinks toward the input (vanishing), negative when it grows
toward the input (exploding); one number that ranks architectures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ablations.config import DiagnoseConfig  # the one source of the thresholds' defaults

DEFAULTS: dict[str, float] = DiagnoseConfig().model_dump()


def block_kernels(params: pd.DataFrame) -> pd.DataFrame:
    """Rows of each block's first linear kernel, or its recurrent layer's input kernel (the per-block
    weight-gradient series)."""
    if params.empty:
        return params
    return params[(params["role"] == "block") & (params["param"] == "kernel")
                  & ((params["layer"] == params["block"] + "_linear") | (params["layer"] == params["block"] + "_rnn"))]


def drop_inactive(params: pd.DataFrame, blocks: pd.DataFrame | None) -> pd.DataFrame:
    """``params`` with the gradient statistics of switched-off blocks set to NaN.

    A stochastic-depth block whose branch was off for the whole batch (``active == 0`` in ``blocks``, Huang
    et al. 2016) and a ReZero block whose residual weight is exactly 0 (``alpha == 0``, its initial value,
    Bachlechner et al. 2020) get no gradient in the branch at that step by design: a zero there is not a
    vanishing gradient, so ratios, decay rates and verdicts leave it out. The stored tables keep the zeros.
    """
    if blocks is None or blocks.empty or params.empty:
        return params
    mask = np.zeros(len(blocks), bool)
    for col in ("active", "alpha"):
        if col in blocks:
            mask |= (blocks[col] == 0).to_numpy()
    off = blocks.loc[mask, ["step", "depth"]]
    if off.empty:
        return params
    hit = pd.MultiIndex.from_frame(params[["step", "depth"]]).isin(pd.MultiIndex.from_frame(off))
    hit &= (params["role"] == "block").to_numpy()
    params = params.copy()
    params.loc[hit, [c for c in ("grad_norm", "update_norm", "update_ratio") if c in params]] = np.nan
    return params


def decay_rates(params: pd.DataFrame) -> pd.Series:
    """Gradient-decay rate per captured step (index: step), NaN where fewer than 2 finite blocks."""
    k = block_kernels(params)
    if k.empty:
        return pd.Series(dtype=float)
    k = k[np.isfinite(k["grad_norm"]) & (k["grad_norm"] > 0)]
    out = {}
    for step, g in k.groupby("step"):
        if g["depth"].nunique() < 2:
            out[step] = math.nan
            continue
        slope = np.polyfit(g["depth"].to_numpy(float), np.log10(g["grad_norm"].to_numpy(float)), 1)[0]
        out[step] = float(slope)  # positive: the gradient shrinks toward the input (block 0)
    return pd.Series(out, dtype=float).sort_index()


def first_last_ratio(params: pd.DataFrame, step: int) -> float:
    """Kernel gradient norm of the first block divided by that of the last block at ``step`` (NaN if n/a)."""
    k = block_kernels(params)
    k = k[k["step"] == step].sort_values("depth")
    if len(k) < 2:
        return math.nan
    first, last = float(k["grad_norm"].iloc[0]), float(k["grad_norm"].iloc[-1])
    return first / last if last > 0 else math.nan


def gradient_summary(params: pd.DataFrame, blocks: pd.DataFrame | None = None) -> dict[str, Any]:
    """First/last-block gradient ratios and decay rates at the first and last captured steps (switched-off
    stochastic-depth blocks left out, see :func:`drop_inactive`)."""
    params = drop_inactive(params, blocks)
    if params.empty:
        return {"ratio_init": math.nan, "ratio_final": math.nan, "decay_rate_init": math.nan,
                "decay_rate_final": math.nan}
    steps = np.sort(params["step"].unique())
    rates = decay_rates(params)
    return {"ratio_init": first_last_ratio(params, int(steps[0])),
            "ratio_final": first_last_ratio(params, int(steps[-1])),
            "decay_rate_init": float(rates.iloc[0]) if len(rates) else math.nan,
            "decay_rate_final": float(rates.iloc[-1]) if len(rates) else math.nan}


def block_ranges(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"blocks 0-2, 5"``."""
    blocks = sorted(set(int(b) for b in blocks))
    if not blocks:
        return "no blocks"
    parts, start, prev = [], blocks[0], blocks[0]
    for b in blocks[1:] + [None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return ("block " if len(blocks) == 1 else "blocks ") + ", ".join(parts)


def _window(df: pd.DataFrame, window: int, at_init: bool) -> tuple[pd.DataFrame, str]:
    steps = np.sort(df["step"].unique())
    if at_init:
        chosen = steps[: max(1, min(len(steps), 5))]
        label = f"over the first {len(chosen)} captured step{'s' * (len(chosen) > 1)}"
    else:
        last = steps[-1]
        chosen = steps[steps > last - window]
        label = f"over the last {int(last - chosen[0] + 1)} steps"
    return df[df["step"].isin(chosen)], label


def _verdict(kind: str, blocks: list[int], message: str) -> dict[str, Any]:
    return {"kind": kind, "blocks": sorted(int(b) for b in blocks), "message": message}


def verdicts(params: pd.DataFrame, blocks: pd.DataFrame, history: pd.DataFrame,
             thresholds: dict[str, float] | None = None, at_init: bool = False) -> list[dict[str, Any]]:
    """Diagnoses an arm from its tables.

    Args:
        params, blocks, history: the arm's tables (as stored).
        thresholds: overrides of :data:`DEFAULTS`.
        at_init: judge the first captured steps only (used to prune searches early).

    Returns:
        A list of ``{"kind", "blocks", "message"}``; empty when nothing is wrong.
    """
    th = {**DEFAULTS, **(thresholds or {})}
    out: list[dict[str, Any]] = []
    k = block_kernels(drop_inactive(params, blocks))
    if not k.empty:
        win, label = _window(k, int(th["window"]), at_init)
        med = win.groupby("depth")["grad_norm"].median().sort_index()
        finite = med[np.isfinite(med)]
        if (~np.isfinite(win["grad_norm"])).any() or (len(history) and (~np.isfinite(history["loss"])).any()):
            bad = sorted(win.loc[~np.isfinite(win["grad_norm"]), "depth"].unique())
            out.append(_verdict("exploding", bad, f"non-finite gradients or loss {label}"))
        elif len(finite) >= 2 and finite.iloc[-1] > 0:
            rel = finite / finite.iloc[-1]
            ratio = float(rel.iloc[0])
            weak = [d for d, r in rel.items() if r < th["vanishing_ratio"]]
            floor = [d for d, g in finite.items() if g < th["vanishing_floor"]]
            if ratio < th["vanishing_ratio"] or floor:
                who = sorted(set(weak) | set(floor))
                out.append(_verdict("vanishing", who,
                                    f"{block_ranges(who)} receive < {th['vanishing_ratio']:g} of the gradient of "
                                    f"block {int(finite.index[-1])} (first/last ratio {ratio:.1e}) {label}"))
            elif ratio > th["exploding_ratio"]:
                strong = [d for d, r in rel.items() if r > th["exploding_ratio"]]
                out.append(_verdict("exploding", strong,
                                    f"{block_ranges(strong)} receive > {th['exploding_ratio']:g}x the gradient of "
                                    f"block {int(finite.index[-1])} (first/last ratio {ratio:.1e}) {label}"))
        if "update_ratio" in win and np.isfinite(win["update_ratio"]).any():
            ur = win.groupby("depth")["update_ratio"].median()
            stalled = ur[ur < th["stall_ratio"]]
            if len(stalled):
                out.append(_verdict("stalled", list(stalled.index),
                                    f"{block_ranges(stalled.index)}: update ratio {stalled.min():.0e}.."
                                    f"{stalled.max():.0e} < {th['stall_ratio']:g} {label}"))
    if not blocks.empty:
        win, label = _window(blocks, int(th["window"]), at_init)
        for col, kind, key, what in [("act_saturation", "saturated", "saturated_fraction", "saturated entries"),
                                     ("act_dead", "dead_units", "dead_fraction", "dead units")]:
            if col not in win or not np.isfinite(win[col]).any():
                continue
            med = win.groupby("depth")[col].median()
            hit = med[med > th[key]]
            if len(hit):
                out.append(_verdict(kind, list(hit.index),
                                    f"{block_ranges(hit.index)}: {hit.min():.0%}..{hit.max():.0%} {what} "
                                    f"(> {th[key]:.0%}) {label}"))
    if not at_init and len(history) >= 4:
        out.extend(_plateau(history, th))
    return out


def _plateau(history: pd.DataFrame, th: dict[str, float]) -> list[dict[str, Any]]:
    h = history[np.isfinite(history["loss"])].sort_values("step")
    if len(h) < 4:
        return []
    last = h["step"].iloc[-1]
    w = int(th["window"])
    if last - h["step"].iloc[0] + 1 < 2 * w:  # short run: compare its halves
        w = max(1, int((last - h["step"].iloc[0] + 1) // 2))
    recent = h[h["step"] > last - w]["loss"].mean()
    before = h[(h["step"] <= last - w) & (h["step"] > last - 2 * w)]["loss"].mean()
    if not (np.isfinite(recent) and np.isfinite(before)) or before <= 0:
        return []
    gain = (before - recent) / before
    if gain < th["plateau_improvement"]:
        return [_verdict("plateau", [], f"training loss {before:.3g} -> {recent:.3g} ({gain:+.1%}) over the last "
                                        f"{w} steps (< {th['plateau_improvement']:.0%} improvement)")]
    return []
