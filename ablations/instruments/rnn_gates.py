"""LSTM/GRU gate statistics (``gates.parquet``), at init and after training.

Gers et al. 2000: an LSTM forget gate near 1 carries the gradient across long lags; a gate saturated shut
(< 0.05) or open (> 0.95) has a sigmoid derivative under 0.05. Read on one training batch in inference mode,
outside the compiled step (twice per arm), so it costs nothing per step.
"""

from __future__ import annotations

from typing import Any

from ablations.lazy import pd

from ablations.instruments.base import Column, Instrument

GATED_CELLS = ("LSTMCell", "GRUCell")


class RNNGates(Instrument):
    """Mean gate value and the shares saturated shut / open, per recurrent layer and gate."""

    name = "rnn_gates"
    table = "gates"
    order = 80
    columns = (
        Column("layer", "the recurrent layer"), Column("depth", "its block index"),
        Column("gate", "input, forget, output (LSTM) or update, reset (GRU)"),
        Column("mean", "mean gate value over the batch, time steps and units"),
        Column("frac_low", "share of entries < 0.05 (saturated shut)"),
        Column("frac_high", "share of entries > 0.95 (saturated open)"),
        Column("when", "init (before training) or end"),
    )
    snapshot_only = True  # no in-graph part: read by the recorder at the start and the end of training

    def applies(self) -> bool:
        if not any(type(getattr(layer, "cell", None)).__name__ in GATED_CELLS
                   for layer in getattr(self.spec.net, "layers", [])):
            return False
        from ablations.instruments._rnn_views import chain_problem

        why = chain_problem(self.spec.net)
        if why:
            self.spec.notes.append(f"no LSTM/GRU gate statistics (gates): {why}")
        return why is None

    def snapshot(self, x: Any, when: str) -> pd.DataFrame:
        from ablations.instruments._rnn_views import gate_statistics

        return gate_statistics(self.spec.net, x).assign(when=when)
