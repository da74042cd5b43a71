"""Gradients through time (``time_grads.parquet``): ||dL/dh_t|| of every recurrent layer at every step t.

Pascanu, Mikolov & Bengio 2013: through time the gradient is multiplied by one recurrent Jacobian per step,
so it vanishes or explodes with their spectral radius. dL/dh_t is the total derivative (through the output
at t and every later state), read from zero "eps" inputs added to the state in a weight-sharing view of the
model (:mod:`ablations.instruments._rnn_views`), before the update, for the global batch. On captured steps the
probe trains through that view (:meth:`forward_view`), so they come from the training backward pass itself;
``measure`` and models the view cannot stand in for take one more forward/backward pass through it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ablations.lazy import pd

from ablations.instruments.base import Column, Finish, Instrument, Reducer, StepContext, tf

import zoo


class TimeGrads(Instrument):
    """||dL/dh_t|| per recurrent layer and time step (from the training backward pass on captured steps)."""

    name = "time_grads"
    table = "time_grads"
    order = 70
    columns = (
        Column("layer", "the recurrent layer (block_<i>_rnn)"),
        Column("depth", "its block index"),
        Column("t", "time step"),
        Column("act_grad_norm", "||dL/dh_t||: the total derivative w.r.t. the layer's state at step t"),
    )

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._view = None

    def applies(self) -> bool:
        if not any(v.recurrent is not None for v in self.spec.views):
            return False
        from ablations.instruments._rnn_views import chain_problem

        why = chain_problem(self.spec.net)
        if why:  # e.g. a user's LSTM model: its blocks get per-tensor and per-block rows, not these; say so
            self.spec.notes.append(f"no gradients through time (time_grads): {why}")
        return why is None

    @property
    def view(self) -> Any:
        if self._view is None:
            from ablations.instruments._rnn_views import shared_time_view

            self._view = shared_time_view(self.spec.net)  # shares the cells' variables; built once
        return self._view

    def forward_view(self) -> Any:
        from ablations.instruments._rnn_views import training_view

        return training_view(self.spec.net)

    def shape(self) -> tuple[int, ...]:
        return (len(self.view.names), max(self.view.lengths))

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        from ablations.instruments._rnn_views import step_time_grads

        probe = self.view
        grads = step_time_grads(probe, ctx)
        t_max = max(probe.lengths)
        rows = []
        for g, t in zip(grads, probe.lengths):
            sq = tf.reduce_sum(tf.square(tf.cast(g, tf.float32)), axis=[0, 2])
            rows.append(tf.pad(sq, [[0, t_max - t]], constant_values=float("nan")) if t < t_max else sq)
        handle = red.sums(tf.stack(rows))  # sums of squares add over replicas
        return lambda r: tf.sqrt(r(handle))

    def frame(self, steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        probe = self.view
        n, n_layers, t_max = values.shape
        df = pd.DataFrame({
            "step": np.repeat(steps, n_layers * t_max), "epoch": np.repeat(epochs, n_layers * t_max),
            "layer": np.tile(np.repeat(probe.names, t_max), n),
            "depth": np.tile(np.repeat([zoo.parse_layer_name(x)[0] for x in probe.names], t_max), n),
            "t": np.tile(np.arange(t_max), n * n_layers), "act_grad_norm": values.reshape(-1)})
        lengths = np.repeat(np.tile(list(probe.lengths), n), t_max)
        return df[np.isfinite(df["act_grad_norm"]) | (df["t"] < lengths)].reset_index(drop=True)
