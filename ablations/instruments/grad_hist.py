"""Per-block histograms of log2|dL/dW| (``grad_hist.parquet``, ``capture.histograms``).

Where a block's gradient entries sit, not just their norm: a plain sigmoid net's whole distribution slides
left block by block toward the input (Glorot & Bengio 2010). Bin k counts entries in
[2^(HIST_EXP_LO + k), 2^(HIST_EXP_LO + k + 1)) (about 0.3 decades), from ~7e-21 to 256, read straight off the
float32 exponent bits (no log per entry); entries outside fall into the end bins (NaN/Inf into the top one)
and exact zeros get a count of their own (bin -1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ablations.lazy import pd

from ablations.instruments.base import Column, EveryOptions, Finish, Instrument, Reducer, StepContext, tf

HIST_EXP_LO, HIST_EXP_HI = -67, 7
HIST_BINS = HIST_EXP_HI - HIST_EXP_LO + 1
HIST_RANGE = (HIST_EXP_LO * math.log10(2.0), (HIST_EXP_HI + 1) * math.log10(2.0))  # log10 of the outer edges


def hist_groups(spec: Any) -> list[tuple[int, list[int]]]:
    """``(block row, [param row, ...])``: the kernel tensors of each block."""
    rows = {d: i for i, d in enumerate(spec.blocks["depth"])}
    out: dict[int, list[int]] = {}
    for i, (role, depth, param) in enumerate(zip(spec.params["role"], spec.params["depth"], spec.params["param"])):
        if role == "block" and str(param).endswith("kernel") and depth in rows:
            out.setdefault(rows[depth], []).append(i)
    return sorted(out.items())


def gradient_histograms(grads: list[Any], groups: list[tuple[int, list[int]]], n_blocks: int) -> Any:
    """[n_blocks, HIST_BINS + 1] float32: per block, counts of |g| per binary exponent and of exact zeros.

    The bin of an entry is its float32 exponent field (bits 23-30 of |g|): a shift and a bincount, no log.
    """
    bias = 127  # IEEE 754 single-precision exponent bias
    rows = []
    for _, idx in groups:
        g = tf.abs(tf.concat([tf.reshape(tf.cast(grads[i], tf.float32), [-1]) for i in idx], axis=0))
        bits = tf.bitcast(g, tf.int32)
        zero = tf.reduce_sum(tf.cast(tf.equal(bits, 0), tf.float32))
        e = tf.clip_by_value(tf.bitwise.right_shift(bits, 23) - (bias + HIST_EXP_LO), 0, HIST_BINS - 1)
        # The raw op with a constant size: tf.math.bincount derives the size from the data, which XLA
        # (jit_compile, TPU) refuses.
        h = tf.raw_ops.DenseBincount(input=e, size=tf.constant(HIST_BINS, tf.int32), weights=tf.zeros([0], tf.float32),
                                     binary_output=False)
        h = tf.tensor_scatter_nd_sub(h, [[0]], [zero])  # zeros were counted in the first bin
        rows.append(tf.concat([h, zero[None]], axis=0))
    if not rows:
        return tf.zeros([n_blocks, HIST_BINS + 1])
    return tf.scatter_nd(tf.constant([[r] for r, _ in groups], tf.int32), tf.stack(rows), [n_blocks, HIST_BINS + 1])


class GradHist(Instrument):
    """Histogram of log2|dL/dW| over each block's kernels, of the global-batch gradients."""

    name = "grad_hist"
    table = "grad_hist"
    order = 60
    default = False
    Opts = EveryOptions
    needs = frozenset({"grads"})
    columns = (
        Column("bin", "bin index (-1: exact zeros)"),
        Column("log10_lo", "log10 of the bin's lower edge"),
        Column("log10_hi", "log10 of the bin's upper edge"),
        Column("count", "entries of |dL/dW| in the bin, over the block's kernels"),
        Column("fraction", "count / entries of the block's kernels"),
    )

    def applies(self) -> bool:
        return bool(hist_groups(self.spec))

    def shape(self) -> tuple[int, ...]:
        return (self.spec.n_blocks, HIST_BINS + 1)

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        hist = gradient_histograms(ctx.global_grads, hist_groups(self.spec), self.spec.n_blocks)
        return lambda r: hist

    def frame(self, steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        spec = self.spec
        rows = [r for r, _ in hist_groups(spec)]
        edges = (HIST_EXP_LO + np.arange(HIST_BINS + 1)) * np.log10(2.0)  # binary bins, as log10
        n, k, nb = len(steps), len(rows), HIST_BINS + 1
        c = values[:, rows, :]  # [n, k, bins + zeros]
        df = pd.DataFrame({
            "step": np.repeat(steps, k * nb), "epoch": np.repeat(epochs, k * nb),
            "depth": np.tile(np.repeat(spec.blocks["depth"].to_numpy()[rows], nb), n),
            "block": np.tile(np.repeat(spec.blocks["block"].to_numpy()[rows], nb), n),
            "bin": np.tile(np.append(np.arange(HIST_BINS), -1), n * k),
            "log10_lo": np.tile(np.append(edges[:-1], np.nan), n * k),
            "log10_hi": np.tile(np.append(edges[1:], np.nan), n * k),
            "count": c.reshape(-1).astype(np.int64)})
        total = np.repeat(c.sum(axis=2).reshape(-1), nb)
        with np.errstate(divide="ignore", invalid="ignore"):
            df["fraction"] = np.where(total > 0, df["count"] / total, np.nan)
        return df

    @classmethod
    def tensorboard(cls, tables: dict[str, pd.DataFrame], events: Any) -> None:
        hist = tables.get("grad_hist", pd.DataFrame())
        for block, g in (hist[hist["bin"] >= 0].groupby("block", sort=False) if not hist.empty else []):
            events.binned(g, f"grad_hist/{block}")
