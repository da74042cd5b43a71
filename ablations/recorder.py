"""Host side of the probe: a Keras callback that drains the device ring buffer into long DataFrames.

The callback never reads the device per step: it reads the buffer every ``drain_every`` steps and at the
end of each epoch, which is also when it checks the in-graph NaN/Inf flag and stops a diverged arm.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import keras
import numpy as np
import pandas as pd

from ablations.diagnose import decay_rates, drop_inactive
from ablations.probe import ProbedModel
from ablations.statistics import BLOCK_STATS, HIST_BINS, HIST_EXP_LO, PARAM_STATS, STEP_STATS


def ring_capacity(every: int, drain_every: int, steps_per_epoch: int, steps_per_execution: int) -> int:
    """Slots needed between two drains, doubled for the callbacks Keras runs asynchronously."""
    window = min(drain_every, steps_per_epoch) + steps_per_execution
    return 2 * math.ceil(window / every) + 4


class DrainCallback(keras.callbacks.Callback):
    """Drains the probe's ring buffer; also stops training once the loss is NaN/Inf.

    Args:
        drain_every: steps between mid-epoch drains.
        steps_per_epoch: for the ``epoch`` column.
    """

    async_safe = True  # lets Keras dispatch batch-end hooks on a worker thread (no sync on the train loop)

    def __init__(self, drain_every: int, steps_per_epoch: int):
        super().__init__()
        self.drain_every = drain_every
        self.steps_per_epoch = steps_per_epoch
        self._lock = threading.Lock()
        self._drained = 0
        self._last = 0
        self.lost = 0
        self.steps: list[np.ndarray] = []
        self.scalars: list[np.ndarray] = []
        self.param_rows: list[np.ndarray] = []
        self.block_rows: list[np.ndarray] = []
        self.time_rows: list[np.ndarray] = []
        self.hist_rows: list[np.ndarray] = []
        self.diverged_at: int | None = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._last = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch + 1 - self._last >= self.drain_every:
            self._last = batch + 1
            self.drain()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.drain()

    def on_train_end(self, logs: Any = None) -> None:
        self.drain()

    def drain(self) -> None:
        model: ProbedModel = self.model
        with self._lock:
            buf = model.ring.read()
            count, cap = int(buf["count"]), model.ring.capacity
            new = count - self._drained
            if new > cap:  # should not happen with ring_capacity(); recorded, never silent
                self.lost += new - cap
                self._drained = count - cap
                new = cap
            if new > 0:
                idx = np.arange(self._drained, count) % cap
                self.steps.append(buf["steps"][idx])
                self.scalars.append(buf["scalars"][idx])
                self.param_rows.append(buf["params"][idx])
                self.block_rows.append(buf["blocks"][idx])
                if "time" in buf:
                    self.time_rows.append(buf["time"][idx])
                if "hist" in buf:
                    self.hist_rows.append(buf["hist"][idx])
                self._drained = count
            bad = int(buf["first_nonfinite"])
            if bad >= 0 and self.diverged_at is None:
                self.diverged_at = bad
                model.stop_training = True

    # ------------------------------------------------------------------------------------------- tables

    def tables(self, model: ProbedModel) -> dict[str, pd.DataFrame]:
        """Returns ``history``, ``params`` and ``blocks`` DataFrames (rows after divergence dropped)."""
        spec = model.spec
        steps = np.concatenate(self.steps) if self.steps else np.zeros([0], np.int64)
        scalars = np.concatenate(self.scalars) if self.scalars else np.zeros([0, len(STEP_STATS)])
        params = np.concatenate(self.param_rows) if self.param_rows else np.zeros([0, len(spec.params), len(PARAM_STATS)])
        blocks = np.concatenate(self.block_rows) if self.block_rows else np.zeros([0, len(spec.blocks), len(BLOCK_STATS)])
        keep = steps <= self.diverged_at if self.diverged_at is not None else np.ones(len(steps), bool)
        steps, scalars, params, blocks = steps[keep], scalars[keep], params[keep], blocks[keep]
        epoch = steps // max(self.steps_per_epoch, 1)

        history = pd.DataFrame({"step": steps, "epoch": epoch})
        for i, name in enumerate(STEP_STATS):
            history[name] = scalars[:, i]

        def long(static: pd.DataFrame, values: np.ndarray, names: tuple[str, ...]) -> pd.DataFrame:
            n, k = len(steps), len(static)
            df = pd.DataFrame({"step": np.repeat(steps, k), "epoch": np.repeat(epoch, k)})
            for col in static.columns:
                df[col] = np.tile(static[col].to_numpy(), n)
            flat = values.reshape(n * k, len(names))
            for i, name in enumerate(names):
                df[name] = flat[:, i]
            return df

        p = long(spec.params, params, PARAM_STATS)
        with np.errstate(divide="ignore", invalid="ignore"):
            # Undefined for an all-zero tensor (biases at init): NaN, not inf.
            p["update_ratio"] = (p["update_norm"] / p["weight_norm"]).where(p["weight_norm"] > 0)
        b = long(spec.blocks, blocks, BLOCK_STATS)
        history["grad_decay_rate"] = history["step"].map(decay_rates(drop_inactive(p, b))).astype(float)
        out = {"history": history, "params": p, "blocks": b}
        probe = getattr(model, "time_probe", None)
        if probe is not None and self.time_rows:
            out["time_grads"] = _time_table(probe, steps, epoch, np.concatenate(self.time_rows)[keep])
        if self.hist_rows:
            out["grad_hist"] = _hist_table(spec, steps, epoch, np.concatenate(self.hist_rows)[keep])
        return out


def _hist_table(spec: Any, steps: np.ndarray, epoch: np.ndarray, counts: np.ndarray) -> pd.DataFrame:
    """``grad_hist.parquet``: per (captured step, block with kernels, bin) the count and fraction of kernel-
    gradient entries with log10|g| in [log10_lo, log10_hi) (factor-2 bins); bin -1 counts exact zeros."""
    rows = [r for r, _ in spec.hist_groups()]
    edges = (HIST_EXP_LO + np.arange(HIST_BINS + 1)) * np.log10(2.0)  # binary bins, as log10
    n, k, nb = len(steps), len(rows), HIST_BINS + 1
    c = counts[:, rows, :]  # [n, k, bins + zeros]
    bins = np.append(np.arange(HIST_BINS), -1)
    df = pd.DataFrame({
        "step": np.repeat(steps, k * nb), "epoch": np.repeat(epoch, k * nb),
        "depth": np.tile(np.repeat(spec.blocks["depth"].to_numpy()[rows], nb), n),
        "block": np.tile(np.repeat(spec.blocks["block"].to_numpy()[rows], nb), n),
        "bin": np.tile(bins, n * k),
        "log10_lo": np.tile(np.append(edges[:-1], np.nan), n * k),
        "log10_hi": np.tile(np.append(edges[1:], np.nan), n * k),
        "count": c.reshape(-1).astype(np.int64)})
    total = np.repeat(c.sum(axis=2).reshape(-1), nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["fraction"] = np.where(total > 0, df["count"] / total, np.nan)
    return df


def _time_table(probe: Any, steps: np.ndarray, epoch: np.ndarray, norms: np.ndarray) -> pd.DataFrame:
    """``time_grads.parquet``: one row per (captured step, recurrent layer, t) with ||dL/dh_t||."""
    import zoo

    n, n_layers, t_max = norms.shape
    df = pd.DataFrame({
        "step": np.repeat(steps, n_layers * t_max), "epoch": np.repeat(epoch, n_layers * t_max),
        "layer": np.tile(np.repeat(probe.names, t_max), n),
        "depth": np.tile(np.repeat([zoo.parse_layer_name(x)[0] for x in probe.names], t_max), n),
        "t": np.tile(np.arange(t_max), n * n_layers), "act_grad_norm": norms.reshape(-1)})
    return df[np.isfinite(df["act_grad_norm"]) | (df["t"] < np.repeat(
        np.tile([probe.lengths[i] for i in range(n_layers)], n), t_max))].reset_index(drop=True)
