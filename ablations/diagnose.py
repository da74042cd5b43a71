"""Verdicts: plain-language diagnoses of gradient flow, computed from the stored tables (no TensorFlow).

Each verdict names the blocks and the evidence, e.g. ``"blocks 0-11: update ratio 2e-05..4e-04 < 1e-3 over
the last 200 steps"``. Thresholds (all overridable under ``diagnose:`` in the YAML):

* vanishing: first/last block kernel-gradient ratio < 1e-3 (AUTOTRAINER, Zhang et al. 2021), or a block's
  gradient norm below an absolute floor of 1e-8 (also when every block's is 0 and no ratio exists);
* exploding: first/last ratio > 70 (AUTOTRAINER) or a non-finite loss or global gradient norm;
* stalled: update/weight ratio < 1e-3 (the seed's rule: below it a layer is barely learning);
* saturated: more than 80% of a block's activation entries have a derivative < 5% of the maximum
  (Glorot & Bengio 2010's saturated sigmoid units; our threshold);
* dead units: more than 40% of a block's units have zero derivative for the whole batch (our threshold);
* plateau: the mean training loss of the last window changed by less than 1% (either way) from the window
  before;
* rising_loss: it rose by more than that instead (a rising loss is not a plateau).

The gradient-decay rate is the least-squares slope of log10(block kernel gradient norm) against block depth:
decades per block, positive when the gradient shrinks toward the input (vanishing), negative when it grows
toward the input (exploding); one number that ranks architectures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.config import DiagnoseConfig  # the one source of the thresholds' defaults
from ablations.instruments.block_scalars import drop_inactive
from ablations.instruments.param_norms import (block_kernels, decay_rates, first_last_ratio,  # noqa: F401
                                               gradient_summary)

DEFAULTS: dict[str, float] = DiagnoseConfig().model_dump()


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
    k = block_kernels(drop_inactive(params, blocks), blocks)  # switched-off blocks are left out, not NaN
    bad = _non_finite(k, history, int(th["window"]), at_init)
    if bad is not None:
        out.append(bad)
    if not k.empty:
        win, label = _window(k, int(th["window"]), at_init)
        if bad is None:
            out.extend(_flow(win, label, th))
        out.extend(_stalled(win, label, th))
    if blocks is not None and not blocks.empty:
        out.extend(_activations(blocks, th, at_init))
    if not at_init and history is not None and len(history) >= 4:
        out.extend(_plateau(history, th))
    return out


def _non_finite(k: pd.DataFrame, history: pd.DataFrame, window: int, at_init: bool) -> dict[str, Any] | None:
    """``exploding`` when the loss or the global gradient norm turned NaN/Inf (at init: in the first steps).

    Judged on ``history``, whose columns are always measured: a NaN in a per-block column can also mean
    "not captured" (``capture.params: false``) or "switched off by design", which is no evidence of anything.
    """
    if history is None or history.empty:  # tables without a history (hand-made): the per-block norms
        g = k["grad_norm"].astype(float) if not k.empty else pd.Series(dtype=float)
        if np.isfinite(g).all() or g.isna().all():  # all NaN: not captured (capture.params false)
            return None
        win, label = _window(k, window, at_init)
        bad = sorted(win.loc[~np.isfinite(win["grad_norm"].astype(float)), "depth"].unique())
        return _verdict("exploding", bad, f"non-finite gradients {label}") if bad else None
    h = _window(history, window, at_init)[0] if at_init else history
    cols = [c for c in ("loss", "global_grad_norm") if c in h]
    values = h[cols].to_numpy(dtype=float)
    if not cols or np.isfinite(values).all():
        return None
    first = int(h["step"].to_numpy()[~np.isfinite(values).all(axis=1)].min())
    blocks: list[int] = []
    if not k.empty:
        g = k.loc[k["step"] == first, ["depth", "grad_norm"]]
        if g["grad_norm"].notna().any():  # captured: name the blocks whose gradient is NaN/Inf there
            blocks = sorted(g.loc[~np.isfinite(g["grad_norm"].astype(float)), "depth"].unique())
    return _verdict("exploding", blocks, f"non-finite gradients or loss from step {first}")


def _flow(win: pd.DataFrame, label: str, th: dict[str, float]) -> list[dict[str, Any]]:
    """``vanishing`` / ``exploding`` from the window's median kernel-gradient norm per block: the first/last
    ratio, and the absolute floor (judged even when the last block's gradient is 0 too: an all-zero
    gradient is the deepest vanishing, not a missing one)."""
    med = win.groupby("depth")["grad_norm"].median().sort_index()
    finite = med[np.isfinite(med)]
    if finite.empty:
        return []
    last_depth, last = int(finite.index[-1]), float(finite.iloc[-1])
    rel = finite / last if len(finite) >= 2 and last > 0 else pd.Series(dtype=float)
    ratio = float(rel.iloc[0]) if len(rel) else float("nan")
    weak = [int(d) for d, r in rel.items() if r < th["vanishing_ratio"]]
    floor = [int(d) for d, g in finite.items() if g < th["vanishing_floor"]]
    if ratio < th["vanishing_ratio"] or floor:
        return [_verdict("vanishing", sorted(set(weak) | set(floor)),
                         _vanishing_message(weak, finite[[d for d in floor if d not in weak]], ratio, last_depth,
                                            label, th))]
    if ratio > th["exploding_ratio"]:
        strong = [d for d, r in rel.items() if r > th["exploding_ratio"]]
        return [_verdict("exploding", strong, f"{block_ranges(strong)} receive > {th['exploding_ratio']:g}x the "
                                              f"gradient of block {last_depth} (first/last ratio "
                                              f"{ratio:.1e}) {label}")]
    return []


def _vanishing_message(weak: list[int], floored: pd.Series, ratio: float, last_depth: int, label: str,
                       th: dict[str, float]) -> str:
    """The ratio clause for blocks far below the last block; the floor clause for the others below the floor
    (a block whose ratio is fine is not said to receive < 1e-3 of the last block's gradient)."""
    parts = []
    if weak:
        parts.append(f"{block_ranges(weak)} receive < {th['vanishing_ratio']:g} of the gradient of block "
                     f"{last_depth} (first/last ratio {ratio:.1e})")
    if len(floored):
        parts.append(f"{block_ranges(floored.index)}: gradient norm {floored.min():.1e}..{floored.max():.1e} < "
                     f"{th['vanishing_floor']:g}")
    return "; ".join(parts) + f" {label}"


def _stalled(win: pd.DataFrame, label: str, th: dict[str, float]) -> list[dict[str, Any]]:
    if "update_ratio" not in win or not np.isfinite(win["update_ratio"]).any():
        return []
    ur = win.groupby("depth")["update_ratio"].median()
    stalled = ur[ur < th["stall_ratio"]]
    if not len(stalled):
        return []
    return [_verdict("stalled", list(stalled.index), f"{block_ranges(stalled.index)}: update ratio "
                                                     f"{stalled.min():.0e}..{stalled.max():.0e} < "
                                                     f"{th['stall_ratio']:g} {label}")]


def _activations(blocks: pd.DataFrame, th: dict[str, float], at_init: bool) -> list[dict[str, Any]]:
    win, label = _window(blocks, int(th["window"]), at_init)
    out = []
    for col, kind, key, what in [("act_saturation", "saturated", "saturated_fraction", "saturated entries"),
                                 ("act_dead", "dead_units", "dead_fraction", "dead units")]:
        if col not in win or not np.isfinite(win[col]).any():
            continue
        med = win.groupby("depth")[col].median()
        hit = med[med > th[key]]
        if len(hit):
            out.append(_verdict(kind, list(hit.index), f"{block_ranges(hit.index)}: {hit.min():.0%}..{hit.max():.0%} "
                                                       f"{what} (> {th[key]:.0%}) {label}"))
    return out


def _plateau(history: pd.DataFrame, th: dict[str, float]) -> list[dict[str, Any]]:
    """``plateau`` when the last window's mean loss changed by less than 1% either way over the window before;
    ``rising_loss`` when it rose by more (a rising loss is no plateau)."""
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
    span = f"training loss {before:.3g} -> {recent:.3g} over the last {w} steps"
    # Symmetric: a change smaller than the threshold either way is a plateau (a flat loss's noise must not
    # flip it to rising_loss); a rise beyond it is a rising loss.
    if gain < -th["plateau_improvement"]:
        return [_verdict("rising_loss", [], f"{span}: it rose by {-gain:.1%}")]
    if gain < th["plateau_improvement"]:
        return [_verdict("plateau", [], f"{span}: {-gain:+.1%} (less than {th['plateau_improvement']:.0%} "
                                        f"improvement)")]
    return []
