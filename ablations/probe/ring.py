"""The device-side ring buffer of captured statistics, one slot per table, sized from the instruments.

Kept out of Keras' tracking (a plain object) so it never enters the saved model. Shared tables (history,
params, blocks) are stored column-major, [capacity, columns, rows], so a captured step stacks its column
vectors without a transpose; the recorder transposes on the host. Slots written at the same cadence share
one step counter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ablations.instruments.base import tf
from ablations.instruments.kernels import num_replicas, unlowered_cond


NO_STEP = 2**62  # "no non-finite step yet": above every step, so the first bad step is the minimum


def _step_or_none(step: int) -> int:
    return -1 if step == NO_STEP else step


class Ring:
    """Slots: ``name -> (shape, cadence)``; each cadence group has its own ``count`` and ``steps``.

    Args:
        capacity: slots held between drains (per cadence group: a group written every k-th capture needs
            fewer, but one capacity keeps the drain logic simple).
        slots: per slot the value shape of one capture and the cadence key it is written at.
    """

    def __init__(self, capacity: int, slots: dict[str, tuple[tuple[int, ...], int]]):
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA  # replicas hold identical (all-reduced) values
        kw = dict(trainable=False, aggregation=agg, synchronization=tf.VariableSynchronization.ON_WRITE)
        self.capacity = capacity
        self.group_of = {name: every for name, (_, every) in slots.items()}
        self.counts = {e: tf.Variable(tf.constant(0, tf.int64), name=f"probe_count_{e}", **kw)
                       for e in sorted(set(self.group_of.values()))}
        self.steps = {e: tf.Variable(tf.zeros([capacity], tf.int64), name=f"probe_steps_{e}", **kw)
                      for e in self.counts}
        self.values = {name: tf.Variable(tf.zeros([capacity, *shape]), name=f"probe_{name}", **kw)
                       for name, (shape, _) in slots.items()}
        # First optimizer step whose loss or gradient was NaN/Inf (NO_STEP: none yet), checked every step: the
        # minimum over the bad steps, so one fused scatter-min a step keeps it (see mark_nonfinite).
        self.first_nonfinite = tf.Variable(tf.constant([NO_STEP], tf.int64), name="probe_nonfinite", **kw)

    def write(self, group: int, step: Any, values: dict[str, Any], due: Any = None) -> None:
        """Appends one capture of the slots ``values`` (all of cadence ``group``); with ``due`` (a bool tensor)
        only when it is true."""
        count = self.counts[group]
        idx = tf.reshape(count % self.capacity, [1, 1])
        pairs = [(self.steps[group], tf.reshape(step, [1]))] + [(self.values[k], v[None]) for k, v in values.items()]
        pairs = [(var, value) for var, value in pairs if 0 not in var.shape]  # e.g. a table with no rows

        def scatter() -> Any:
            for var, value in pairs:
                var.scatter_nd_update(idx, value)
            return tf.constant(True)

        if num_replicas() > 1:  # mirrored variables have no scatter_nd_update (NotImplementedError)
            for var, value in pairs:
                new = tf.tensor_scatter_nd_update(var, idx, value)
                var.assign(new if due is None else tf.where(due, new, var))
        elif due is None:
            scatter()
        else:  # not a write into the slot of the oldest capture, which a full ring still holds for the drain
            unlowered_cond(due, scatter, lambda: tf.constant(False))
        count.assign_add(1 if due is None else tf.cast(due, tf.int64))

    def mark_nonfinite(self, bad: Any, step: Any) -> None:
        """Keeps ``step`` as the first non-finite one if ``bad`` (a bool tensor) and none came before.

        One ResourceScatterMin per step. Reading the flag, comparing and assigning it back (the obvious
        form) cost 0.4-0.5 ms of CPU time per step on the benchmark MLP's plain steps (6% of a 7 ms step,
        side by side); mirrored variables have no scatter ops, so several replicas take that form.
        """
        candidate = tf.where(bad, step, tf.constant(NO_STEP, tf.int64))[None]
        if num_replicas() > 1:
            self.first_nonfinite.assign(tf.minimum(self.first_nonfinite, candidate))
        else:
            self.first_nonfinite.scatter_min(tf.IndexedSlices(candidate, tf.constant([0])))

    def read(self) -> dict[str, Any]:
        """Host copies: ``count``/``steps`` per group, every slot's values, the non-finite flag."""
        return {"counts": {e: int(c.numpy()) for e, c in self.counts.items()},
                "steps": {e: s.numpy() for e, s in self.steps.items()},
                "values": {k: v.numpy() for k, v in self.values.items()},
                "first_nonfinite": _step_or_none(int(self.first_nonfinite.numpy()[0]))}

    def bytes_per_capture(self) -> int:
        """Device bytes one capture of every slot takes (values and its step), the unit the ring is sized in."""
        values = sum(int(np.prod(v.shape[1:])) * v.dtype.size for v in self.values.values())
        return values + 8 * len(self.steps)

    def slots_of(self, group: int) -> list[str]:
        return [k for k, g in self.group_of.items() if g == group]


def empty(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros([0, *shape], np.float32)
