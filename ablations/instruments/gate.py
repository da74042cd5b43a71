"""Highway transform gate per block (``blocks.gate_mean``).

Srivastava, Greff & Schmidhuber 2015: y = H(x) T(x) + x (1 - T(x)); a gate near 0 carries the input through
(the gate bias is initialised negative for that reason), so the gradient reaches early layers.
"""

from __future__ import annotations

from typing import Any

from ablations.instruments.base import Column, Finish, Instrument, Reducer, StepContext, rows_with, tf


class GateMean(Instrument):
    """Mean of each block's highway transform gate T(x) over the global batch."""

    name = "gate"
    table = "blocks"
    order = 45
    columns = (Column("gate_mean", "mean highway transform gate T(x) of the block"),)

    def applies(self) -> bool:
        return bool(rows_with(self.spec, "gate"))

    def taps(self) -> dict[str, list[Any]]:
        return {"gate": [t for _, t in rows_with(self.spec, "gate")]}

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        rows = [row for row, _ in rows_with(self.spec, "gate")]
        gates = ctx.taps["gate"]
        total = red.sums(tf.stack([tf.reduce_sum(tf.cast(g, tf.float32)) for g in gates]))
        count = red.sums(tf.stack([tf.cast(tf.size(g), tf.float32) for g in gates]))
        return lambda r: {"gate_mean": (rows, r(total) / r(count))}
