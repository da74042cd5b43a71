"""``measure()``: the instruments of one batch, eagerly, without training (for notebooks and tests)."""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from ablations import instruments
from ablations.instruments.base import SHARED_TABLES, Reducer, StepContext
from ablations.instruments.block_scalars import off_mask
from ablations.probe.model import (assemble, build_instruments, capture_dict, collect_taps, split_outputs,
                                   table_layout, tap_model)
from ablations.probe.recorder import derive, long_table
from ablations.probe.spec import make_spec


class _LossOnly:
    """What instruments may ask of ``ctx.model`` outside training: the loss and a learning rate of NaN."""

    def __init__(self, loss_fn: Any):
        self.loss_fn = loss_fn
        self.optimizer = type("NoOptimizer", (), {"learning_rate": float("nan")})()

    def _compute_loss(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None, training: bool = True) -> Any:
        return tf.reduce_mean(self.loss_fn(y, y_pred))


def measure_tables(model: keras.Model, batch: Any, loss: Any, *, training: bool = False,
                   capture: Any = None, warn: bool = True) -> dict[str, pd.DataFrame]:
    """Every enabled instrument's table for one batch, as the probe would store them at step 0.

    No update is applied, so update norms are NaN; the weight norms are those of the weights given. What block
    discovery found is in ``tables["history"].attrs["notes"]``; a model without blocks also warns (its block
    statistics, ratio and decay rate stay empty; ``warn=False`` for callers that report the notes themselves).
    """
    x, y = tf.nest.map_structure(tf.convert_to_tensor, tuple(batch))
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    spec = make_spec(model)
    if warn and not spec.n_blocks:  # never silent: every block column would be NaN without a word
        warnings.warn(" ".join(spec.notes), UserWarning, stacklevel=3)
    insts = [i for i in build_instruments(spec, capture_dict(capture)) if not i.snapshot_only]
    taps = collect_taps(insts)
    model_taps = tap_model(spec, taps)
    variables = model.trainable_variables
    grad_taps = list(dict.fromkeys(n for i in insts for n in i.grad_taps))
    with tf.GradientTape() as tape:
        y_pred, got = split_outputs(spec, {k: len(v) for k, v in taps.items()}, model_taps(x, training=training))
        value = tf.reduce_mean(loss_fn(y, y_pred))
    tap_list = [t for n in grad_taps for t in got[n]]
    grads = tape.gradient(value, variables + tap_list)
    ctx = StepContext(spec=spec, model=_LossOnly(loss_fn), x=x, y=y, sample_weight=None,
                      step=tf.constant(0, tf.int64), loss=value, variables=variables, grads=grads[: len(variables)],
                      taps=got, tap_grads={}, scale=None, old_weights=[tf.convert_to_tensor(v) for v in variables],
                      off=off_mask(spec))
    k = len(variables)
    for name in grad_taps:
        n = len(got[name])
        ctx.tap_grads[name] = [ctx.unscale(g) for g in grads[k:k + n]]
        k += n
    red = Reducer()
    pending = [(i, i.compute(ctx, red)) for i in insts]
    resolved = red.finish()
    results = [(i, fin(resolved)) for i, fin in pending if fin is not None]
    layout = table_layout(insts)
    rows = assemble(layout, spec, [r for r in results if r[0].table in SHARED_TABLES])
    steps, epochs = np.zeros([1], np.int64), np.zeros([1], np.int64)
    enabled = [type(i) for i in insts]
    tables = {t: long_table(spec.static(t) if t != "history" else None, steps, epochs,
                            rows[t].numpy()[None] if t in rows else np.zeros([1, 0, 0]), list(layout[t]),
                            instruments.table_columns(t, enabled)) for t in SHARED_TABLES}
    for inst, res in results:
        if inst.table not in SHARED_TABLES:
            tables[inst.table] = inst.frame(steps, epochs, np.asarray(res)[None])
    derive(tables, insts)
    tables["history"].attrs["loss"] = float(value)
    tables["history"].attrs["notes"] = list(spec.notes)
    return tables


def measure(model: keras.Model, batch: Any, loss: Any, *, training: bool = False, capture: Any = None) -> pd.DataFrame:
    """Statistics of one batch without training (no update, so update columns are NaN).

    Args:
        model: a functional model (any zoo model; blocks are found as the probe finds them).
        batch: ``(x, y)``.
        loss: a Keras loss (object, name or callable ``loss(y_true, y_pred)``).
        training: run layers in training mode (dropout, batch statistics).
        capture: a ``capture`` section (default: the standard instruments).

    Returns:
        One row per trainable tensor (``depth, block, layer, param, role, size, grad_norm, weight_norm, ...``)
        with the block's columns joined on by ``depth``, and the batch loss in ``attrs["loss"]``; the other
        tables (``time_grads``...) in ``attrs["tables"]``; what block discovery found (and, for a model
        without blocks, what to do about it: also a warning) in ``attrs["notes"]``.
    """
    tables = measure_tables(model, batch, loss, training=training, capture=capture)
    params = tables["params"].drop(columns=["step", "epoch"])
    blocks = tables["blocks"].drop(columns=["step", "epoch", "block"])
    df = params.merge(blocks, on="depth", how="left")
    df.attrs["loss"] = tables["history"].attrs["loss"]
    df.attrs["notes"] = tables["history"].attrs["notes"]
    df.attrs["tables"] = tables
    return df
