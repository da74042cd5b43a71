"""Host side of the probe: a Keras callback that drains the device ring buffer into long DataFrames.

The callback never reads the device per step: it reads the buffer every ``drain_every`` steps and at the
end of each epoch, which is also when it checks the in-graph NaN/Inf flag and stops a diverged arm. The
tables are built generically: shared tables (history, params, blocks) from the ring's columns plus the
spec's static columns, own tables by their instrument; then every instrument adds its derived columns.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import keras
import numpy as np
import pandas as pd

from ablations import instruments
from ablations.instruments.base import SHARED_TABLES


# ``drain_every: auto``: the ring may hold this share of the trainable weights' bytes (on a small net a
# 256-step ring was 28% of weights and momentum; issue #15's memory target is 15% for everything the probe
# adds), within these bounds on the steps between drains (a drain is one host read of the whole ring, on
# Keras' callback thread).
RING_SHARE = 0.05
AUTO_DRAIN = (16, 256)


def auto_drain_every(bytes_per_capture: int, weight_bytes: int, every: int, steps_per_execution: int) -> int:
    """Most steps between drains whose :func:`ring_capacity` stays within ``RING_SHARE`` of ``weight_bytes``,
    clipped to ``AUTO_DRAIN``."""
    slots = RING_SHARE * weight_bytes / max(bytes_per_capture, 1)
    steps = math.floor((slots - 4) / 2) * every - steps_per_execution
    return int(min(max(steps, AUTO_DRAIN[0]), AUTO_DRAIN[1]))


def weight_bytes(net: Any) -> int:
    """Bytes of ``net``'s trainable weights as float32 (or their float32 master copy under mixed precision)."""
    return sum(int(np.prod(v.shape)) * 4 for v in net.trainable_weights)


def size_ring(model: Any, drain_every: int | str, steps_per_epoch: int, steps_per_execution: int) -> int:
    """Sizes ``model``'s ring (a :class:`~ablations.probe.model.ProbedModel` not yet trained) for
    ``drain_every`` steps between drains (``"auto"``: :func:`auto_drain_every`); returns that interval."""
    if drain_every == "auto":
        drain_every = auto_drain_every(model.ring.bytes_per_capture(), weight_bytes(model.net), model.every,
                                       steps_per_execution)
    model.resize_ring(ring_capacity(model.every, int(drain_every), steps_per_epoch, steps_per_execution))
    return int(drain_every)


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
        self._drained: dict[int, int] = {}
        self._last = 0
        self.lost = 0
        self.steps: dict[int, list[np.ndarray]] = {}
        self.values: dict[str, list[np.ndarray]] = {}
        self.snapshots: dict[str, list[pd.DataFrame]] = {}
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

    def forget_counts(self) -> None:
        """The probe's ring buffer was replaced by a new one, which counts its captures from zero."""
        with self._lock:
            self._drained = {}

    def snapshot(self, model: Any, x: Any, when: str, only: Any = None) -> None:
        """Runs the snapshot instruments (LSTM/GRU gates, Jacobian spectra) on the batch ``x`` (``when``: init |
        end | step; ``only``: these instruments, default all). Frames with a ``step`` column get ``epoch``."""
        step = _iterations(model)
        for inst in model.instruments:
            if inst.snapshot_only and (only is None or inst in only):
                inst.snapshot_step = step
                out = inst.snapshot(x, when)
                for table, df in (out.items() if isinstance(out, dict) else [(inst.table, out)]):
                    if df is None:
                        continue
                    if "step" in df and "epoch" not in df:
                        df.insert(1, "epoch", df["step"].to_numpy() // max(self.steps_per_epoch, 1))
                    self.snapshots.setdefault(table, []).append(df)

    def drain(self) -> None:
        model = self.model
        with self._lock:
            buf = model.ring.read()
            cap = model.ring.capacity
            for group, count in buf["counts"].items():
                done = self._drained.get(group, 0)
                new = count - done
                if new > cap:  # should not happen with ring_capacity(); recorded, never silent
                    self.lost += new - cap
                    done, new = count - cap, cap
                if new > 0:
                    idx = np.arange(done, count) % cap
                    self.steps.setdefault(group, []).append(buf["steps"][group][idx])
                    for slot in model.ring.slots_of(group):
                        self.values.setdefault(slot, []).append(buf["values"][slot][idx])
                self._drained[group] = count
            bad = buf["first_nonfinite"]
            if bad >= 0 and self.diverged_at is None:
                self.diverged_at = bad
                model.stop_training = True

    # ------------------------------------------------------------------------------------------- tables

    def _captures(self, group: int, slot: str | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one slot of a cadence group (slot None: steps only), rows after divergence
        dropped."""
        steps = np.concatenate(self.steps[group]) if self.steps.get(group) else np.zeros([0], np.int64)
        keep = steps <= self.diverged_at if self.diverged_at is not None else np.ones(len(steps), bool)
        if slot is None or not self.values.get(slot):
            return steps[keep], np.zeros([int(keep.sum()), *shape], np.float32)
        return steps[keep], np.concatenate(self.values[slot])[keep]

    def tables(self, model: Any) -> dict[str, pd.DataFrame]:
        """Every table of the arm: ``history``, ``params``, ``blocks`` and the own tables that were recorded."""
        spec, ring = model.spec, model.ring
        enabled = [type(i) for i in model.instruments]
        out = {}
        for table in SHARED_TABLES:
            cols = model.layout[table]
            steps, values = self._captures(model.every, table if cols else None, (len(cols), _rows(spec, table)))
            out[table] = long_table(spec.static(table) if table != "history" else None, steps, self._epochs(steps),
                                    values, list(cols), instruments.table_columns(table, enabled))
        for inst in model.instruments:
            if inst.table in SHARED_TABLES:
                if not inst.snapshot_only and inst.every != model.every:  # its own cadence: its own slot
                    out[inst.table] = self._merge_own_cadence(model, inst, out[inst.table])
                continue
            if inst.snapshot_only:
                for table in (inst.table, *(name for name, _ in inst.more_tables)):
                    if self.snapshots.get(table):
                        out[table] = pd.concat(self.snapshots[table], ignore_index=True)
                continue
            s, values = self._captures(ring.group_of[inst.table], inst.table, inst.shape())
            if len(s):
                out[inst.table] = inst.frame(s, self._epochs(s), values)
        derive(out, model.instruments)
        return out

    def _merge_own_cadence(self, model: Any, inst: Any, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` with ``inst``'s columns filled in from its own slot on the steps it captured (a multiple of
        the probe's cadence, so each has its rows; NaN on the other captures)."""
        from ablations.probe.model import slot_name, slot_shape

        slot, shape = slot_name(inst), slot_shape(model.spec, inst)
        steps, values = self._captures(model.ring.group_of[slot], slot, shape)
        cols = [c.name for c in inst.columns]
        k = shape[1]
        own = pd.DataFrame({"step": np.repeat(steps, k), "_row": np.tile(np.arange(k), len(steps))})
        for j, col in enumerate(cols):
            own[col] = values[:, j, :].reshape(-1).astype(np.float32)
        order = list(table.columns)
        merged = table.drop(columns=cols).assign(_row=np.tile(np.arange(k), len(table) // max(k, 1)))
        merged = merged.merge(own, on=["step", "_row"], how="left")  # a left merge keeps the table's row order
        for col in cols:
            merged[col] = merged[col].astype(np.float32)
        return merged[order]

    def _epochs(self, steps: np.ndarray) -> np.ndarray:
        return steps // max(self.steps_per_epoch, 1)


def _iterations(model: Any) -> int:
    """The optimizer's step (0 before the optimizer is built or without one)."""
    opt = getattr(model, "optimizer", None)
    try:
        return int(opt.iterations.numpy()) if opt is not None else 0
    except (AttributeError, ValueError, TypeError):
        return 0


class SnapshotCallback(keras.callbacks.Callback):
    """Snapshots every :attr:`~ablations.instruments.base.Instrument.snapshot_every` optimizer steps, between
    steps on the host (``when`` = ``step``), for the snapshot instruments that have one (``jacobian``).

    Not ``async_safe``: it must run before the next step changes the weights, so a fit with it dispatches its
    callbacks synchronously. With ``steps_per_execution`` > 1 a snapshot is taken at the first execution end at
    or after each multiple of N (its ``step`` column says which step's weights it saw).

    Args:
        drain: the arm's :class:`DrainCallback` (holds the snapshots).
        batch: returns the batch of inputs the snapshots read (the instruments keep their first examples).
    """

    def __init__(self, drain: DrainCallback, batch: Any):
        super().__init__()
        self.drain, self.batch = drain, batch
        self._x: Any = None
        self._last: dict[str, int] = {}

    @staticmethod
    def wanted(model: Any) -> list[Any]:
        return [i for i in model.instruments if i.snapshot_only and i.snapshot_every]

    def on_train_begin(self, logs: Any = None) -> None:
        step = _iterations(self.model)
        self._last = {i.name: step for i in self.wanted(self.model)}

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        step = _iterations(self.model)
        due = [i for i in self.wanted(self.model)
               if step // i.snapshot_every > self._last.get(i.name, 0) // i.snapshot_every]
        if due:
            for i in due:
                self._last[i.name] = step
            if self._x is None:
                self._x = self.batch()
            self.drain.snapshot(self.model, self._x, "step", only=due)


def _rows(spec: Any, table: str) -> int:
    return {"history": 1, "params": spec.n_params, "blocks": spec.n_blocks}[table]


def long_table(static: pd.DataFrame | None, steps: np.ndarray, epochs: np.ndarray, values: np.ndarray,
               written: list[str], columns: list[str]) -> pd.DataFrame:
    """Long format: one row per (capture, table row); ``values`` is [captures, written columns, rows].

    ``columns`` is the table's stored column order (:func:`ablations.instruments.table_columns`); columns not
    written (an instrument that is off or does not apply) are NaN.
    """
    k = 1 if static is None else len(static)
    n = len(steps)
    df = pd.DataFrame({"step": np.repeat(steps, k), "epoch": np.repeat(epochs, k)})
    if static is not None:
        for col in static.columns:
            df[col] = np.tile(static[col].to_numpy(), n)
    for col in columns:
        if col in written:
            df[col] = values[:, written.index(col), :].reshape(n * k)
        elif col not in df:
            df[col] = np.full(n * k, np.nan, np.float32)
    return df


def derive(tables: dict[str, pd.DataFrame], insts: list[Any]) -> None:
    """Every instrument class's derived columns (each class once, in instrument order)."""
    seen = set()
    for inst in insts:
        cls = type(inst)
        if cls not in seen:
            seen.add(cls)
            cls.derive(tables)


def summarize(tables: dict[str, pd.DataFrame], insts: list[Any]) -> dict[str, Any]:
    """The instruments' summary values of an arm."""
    out: dict[str, Any] = {}
    for cls in dict.fromkeys(type(i) for i in insts):
        out.update(cls.summarize(tables))
    return out
