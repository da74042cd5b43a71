"""In-graph gradient statistics: a ``train_step`` that records layer-wise statistics into a device ring buffer.

The probe computes, for every captured step and inside the compiled step (no per-step host round trip):

* per trainable tensor (``params.parquet``): L2 norm of the gradient, of the weight before the update, of the
  applied update (whatever the optimizer did, clipping included) and their ratio;
* per tagged block (``blocks.parquet``): the L2 norm of dL/d(pre-activation) of the block's first linear layer
  (Glorot & Bengio 2010 show it vanishes where weight gradients do not), and the mean, std, saturated
  fraction and dead-unit fraction of the block's activation;
* per step (``history.parquet``): loss, global gradient norm and learning rate.

Gradients are the global-batch gradients: under a multi-replica strategy a copy is all-reduced for the
statistics only (the optimizer reduces its own), and loss-scaled gradients are unscaled first. Steps that
are not captured run a plain step (a ``tf.cond`` picks the branch), so ``capture.every: 16`` costs almost
nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import pandas as pd
import tensorflow as tf
import keras
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.losses import loss as loss_module

import zoo

# Statistic columns, in buffer order.
PARAM_STATS = ("grad_norm", "weight_norm", "update_norm")
# branch_ratio: ||residual branch|| / ||skip|| at the block's `add` layer; gate_mean: mean of a `gate` layer's
# output (highway transform gate). NaN for blocks without them.
BLOCK_STATS = ("act_grad_norm", "act_mean", "act_std", "act_saturation", "act_dead", "branch_ratio", "gate_mean")
STEP_STATS = ("loss", "global_grad_norm", "lr")

# A unit is saturated where its activation derivative is below this fraction of the activation's maximum
# derivative (e.g. sigmoid' < 0.0125): the definition the report and the verdicts use.
SATURATION_FRACTION = 0.05


def max_derivative(act_layer: keras.layers.Layer) -> float:
    """Largest derivative of an element-wise activation layer, found numerically on [-20, 20]."""
    z = tf.constant(np.linspace(-20.0, 20.0, 40001), dtype=act_layer.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(z)
        a = act_layer(z)
    d = tape.gradient(a, z)
    return float(tf.reduce_max(tf.abs(d))) if d is not None else 0.0


@dataclasses.dataclass
class ProbeSpec:
    """Static description of what is captured for a model (built once, outside the compiled step)."""

    params: pd.DataFrame  # one row per trainable tensor: layer, param, role, depth, block, size
    blocks: pd.DataFrame  # one row per tagged block: depth, block
    tap_model: keras.Model  # inputs -> [output, *taps]; taps grouped as in `groups`
    groups: dict[str, tuple[int, int]]  # tap group -> [start, end) in the taps list (after the output)
    pre_rows: list[int]  # block row of each pre-activation tap
    act_layers: list[keras.layers.Layer]  # activation layers of the blocks that have one
    act_rows: list[int]  # block row of each activation
    act_thresholds: list[float]  # SATURATION_FRACTION * max derivative, per activation
    res_rows: list[int]  # block row of each residual (skip, branch) pair
    gate_rows: list[int]  # block row of each gate

    @property
    def n_pre(self) -> int:
        return len(self.pre_rows)

    def split(self, taps: list[Any]) -> dict[str, list[Any]]:
        """Splits the tap outputs into their groups (pre, act_in, act_out, skip, branch, gate)."""
        return {k: list(taps[a:b]) for k, (a, b) in self.groups.items()}


def make_spec(model: keras.Model, activations: bool = True) -> ProbeSpec:
    """Finds the model's parameters and tagged blocks and builds the tap model that exposes their tensors."""
    layer_of = {}
    for layer in model.layers:
        for v in layer.trainable_weights:
            layer_of.setdefault(id(v), layer.name)
    rows = []
    for v in model.trainable_variables:
        layer_name = layer_of.get(id(v), v.path.split("/")[0])
        role, depth = zoo.layer_role(layer_name)
        parsed = zoo.parse_layer_name(layer_name)
        block = layer_name[: -len(parsed[1]) - 1] if parsed else layer_name
        rows.append(dict(depth=depth, block=block, layer=layer_name, param=v.name, role=role,
                         size=int(np.prod(v.shape))))
    params = pd.DataFrame(rows, columns=["depth", "block", "layer", "param", "role", "size"])

    blocks = zoo.blocks(model)
    block_df = pd.DataFrame({"depth": [b.index for b in blocks], "block": [b.prefix for b in blocks]})
    pre, pre_rows, act_in, act_out, act_layers, act_rows, thresholds = [], [], [], [], [], [], []
    skip, branch, res_rows, gate, gate_rows = [], [], [], [], []
    if activations:
        for row, b in enumerate(blocks):
            if b.linear is not None:
                pre.append(b.linear.output)
                pre_rows.append(row)
            if b.act is not None:
                act_in.append(b.act.input)
                act_out.append(b.act.output)
                act_layers.append(b.act)
                act_rows.append(row)
                thresholds.append(SATURATION_FRACTION * max_derivative(b.act))
            add = b.layers.get("add")
            if add is not None and isinstance(add.input, (list, tuple)) and len(add.input) == 2:
                skip.append(add.input[0])  # zoo convention: Add()([skip, branch])
                branch.append(add.input[1])
                res_rows.append(row)
            if "gate" in b.layers:
                gate.append(b.layers["gate"].output)
                gate_rows.append(row)
    taps, groups = [], {}
    for key, group in [("pre", pre), ("act_in", act_in), ("act_out", act_out), ("skip", skip),
                       ("branch", branch), ("gate", gate)]:
        groups[key] = (len(taps), len(taps) + len(group))
        taps.extend(group)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # same structure as the data
    tap_model = keras.Model(inputs, [model.outputs[0], *taps], name=f"{model.name}_taps")
    return ProbeSpec(params, block_df, tap_model, groups, pre_rows, act_layers, act_rows, thresholds, res_rows,
                     gate_rows)


def _sq(t: tf.Tensor) -> tf.Tensor:
    t = tf.cast(t, tf.float32)
    return tf.reduce_sum(tf.square(t))


def _all_reduce_sum(values: Any) -> Any:
    """SUM over replicas inside a replica context; identity with one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _num_replicas() -> int:
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def block_statistics(spec: ProbeSpec, pre_grads: list[tf.Tensor], taps: dict[str, list[tf.Tensor]]) -> tf.Tensor:
    """Returns a [n_blocks, len(BLOCK_STATS)] float32 tensor (NaN where a block lacks the tensor).

    Args:
        spec: the probe spec.
        pre_grads: dL/d(pre-activation) per pre-activation tap.
        taps: the forward tap tensors by group (:meth:`ProbeSpec.split`).

    Sums are formed per replica and all-reduced once, so the values are those of the global batch.
    """
    n_blocks = len(spec.blocks)
    act_inputs, act_outputs = taps["act_in"], taps["act_out"]
    pieces, unit_counts = [], []
    for g in pre_grads:
        pieces.append(tf.reshape(_sq(g), [1]))
    derivs = []
    for layer, z, a, thr in zip(spec.act_layers, act_inputs, act_outputs, spec.act_thresholds):
        z = tf.stop_gradient(z)
        with tf.GradientTape() as tape:
            tape.watch(z)
            a2 = layer(z)
        d = tf.abs(tf.cast(tape.gradient(a2, z), tf.float32))
        a = tf.cast(a, tf.float32)
        n = tf.cast(tf.size(a), tf.float32)
        alive = tf.reduce_sum(tf.cast(d > 0, tf.float32), axis=0)  # per unit: examples with nonzero slope
        pieces.append(tf.stack([tf.reduce_sum(a), tf.reduce_sum(tf.square(a)), n,
                                tf.reduce_sum(tf.cast(d < thr, tf.float32))]))
        pieces.append(tf.reshape(alive, [-1]))
        unit_counts.append(int(np.prod(alive.shape)) if alive.shape.is_fully_defined() else None)
        derivs.append(d)
    for sk, br in zip(taps["skip"], taps["branch"]):
        pieces.append(tf.stack([_sq(br), _sq(sk)]))
    for g in taps["gate"]:
        g = tf.cast(g, tf.float32)
        pieces.append(tf.stack([tf.reduce_sum(g), tf.cast(tf.size(g), tf.float32)]))
    if not pieces:
        return tf.fill([n_blocks, len(BLOCK_STATS)], float("nan"))
    sizes = [int(p.shape[0]) for p in pieces]
    total = _all_reduce_sum(tf.concat(pieces, axis=0))
    parts = tf.split(total, sizes)
    cols = [[float("nan")] * n_blocks for _ in BLOCK_STATS]
    cols = [list(map(tf.constant, c)) for c in cols]
    for i, row in enumerate(spec.pre_rows):
        cols[0][row] = tf.sqrt(parts[i][0])
    off = len(pre_grads)
    for j, row in enumerate(spec.act_rows):
        s, ss, n, sat = tf.unstack(parts[off + 2 * j])
        alive = parts[off + 2 * j + 1]
        mean = s / n
        cols[1][row] = mean
        cols[2][row] = tf.sqrt(tf.maximum(ss / n - tf.square(mean), 0.0))
        cols[3][row] = sat / n
        cols[4][row] = tf.reduce_mean(tf.cast(tf.equal(alive, 0.0), tf.float32))
    off += 2 * len(spec.act_rows)
    for j, row in enumerate(spec.res_rows):
        br, sk = tf.unstack(parts[off + j])
        cols[5][row] = tf.sqrt(br / sk)
    off += len(spec.res_rows)
    for j, row in enumerate(spec.gate_rows):
        total_g, n = tf.unstack(parts[off + j])
        cols[6][row] = total_g / n
    return tf.stack([tf.stack(c) for c in cols], axis=1) if n_blocks else tf.zeros([0, len(BLOCK_STATS)])


def param_statistics(grads: list[tf.Tensor], old: list[tf.Tensor] | None, new: list[Any]) -> tf.Tensor:
    """Returns a [n_params, 3] float32 tensor: grad, weight (before the update) and update norms."""
    g = tf.stack([_sq(x) for x in grads])
    w_src = old if old is not None else new
    w = tf.stack([_sq(x) for x in w_src])
    if old is not None:
        # Subtract in the variable's dtype, then cast: casting first would round float64 weights to float32
        # and swamp a small update with the rounding error of the weights.
        u = tf.stack([_sq(tf.cast(n, o.dtype) - o) for n, o in zip(new, old)])
    else:
        u = tf.fill(tf.shape(g), float("nan"))
    return tf.sqrt(tf.stack([g, w, u], axis=1))


class _Ring:
    """Device-side ring buffer of captured statistics, drained by :class:`DrainCallback`.

    Kept out of Keras' tracking (a plain object) so it never enters the saved model.
    """

    def __init__(self, capacity: int, n_params: int, n_blocks: int):
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA  # replicas hold identical (all-reduced) values
        sync = tf.VariableSynchronization.ON_WRITE
        kw = dict(trainable=False, aggregation=agg, synchronization=sync)
        self.capacity = capacity
        self.count = tf.Variable(tf.constant(0, tf.int64), name="probe_count", **kw)
        self.steps = tf.Variable(tf.zeros([capacity], tf.int64), name="probe_steps", **kw)
        self.scalars = tf.Variable(tf.zeros([capacity, len(STEP_STATS)]), name="probe_scalars", **kw)
        self.params = tf.Variable(tf.zeros([capacity, n_params, len(PARAM_STATS)]), name="probe_params", **kw)
        self.blocks = tf.Variable(tf.zeros([capacity, n_blocks, len(BLOCK_STATS)]), name="probe_blocks", **kw)
        # First optimizer step whose loss was NaN/Inf (-1: none yet): checked every step, read at drains.
        self.first_nonfinite = tf.Variable(tf.constant(-1, tf.int64), name="probe_nonfinite", **kw)

    def write(self, step: tf.Tensor, scalars: tf.Tensor, params: tf.Tensor, blocks: tf.Tensor) -> None:
        idx = tf.reshape(self.count % self.capacity, [1, 1])
        self.steps.scatter_nd_update(idx, tf.reshape(step, [1]))
        self.scalars.scatter_nd_update(idx, scalars[None])
        self.params.scatter_nd_update(idx, params[None])
        self.blocks.scatter_nd_update(idx, blocks[None])
        self.count.assign_add(1)

    def read(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).numpy() for k in ("count", "steps", "scalars", "params", "blocks",
                                                         "first_nonfinite")}


class ProbedModel(keras.Model):
    """Wraps a zoo model; its ``train_step`` trains exactly like Keras' and records statistics.

    Args:
        net: the functional model to train (saved as ``final.keras``; the wrapper is never saved).
        every: capture every ``every`` optimizer steps.
        capacity: ring buffer slots (captures held on device between drains).
        params: capture per-tensor statistics.
        activations: capture per-block statistics.
    """

    def __init__(self, net: keras.Model, *, every: int = 1, capacity: int = 64, params: bool = True,
                 activations: bool = True, **kwargs: Any):
        super().__init__(name=f"probed_{net.name}", **kwargs)
        spec = make_spec(net, activations=activations)
        self.tap_model = spec.tap_model
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "ring", _Ring(capacity, len(spec.params), len(spec.blocks)))
        self.every = int(every)
        self.capture_params = params
        self.capture_activations = activations

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.tap_model(inputs, training=training)[0]

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        if self.every == 1:
            y_pred = self._step(x, y, sample_weight, step, capture=True)
        else:
            y_pred = tf.cond(
                tf.equal(step % self.every, 0),
                lambda: self._step(x, y, sample_weight, step, capture=True),
                lambda: self._step(x, y, sample_weight, step, capture=False),
            )
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _step(self, x: Any, y: Any, sample_weight: Any, step: tf.Tensor, capture: bool) -> tf.Tensor:
        spec = self.spec
        with tf.GradientTape() as tape:
            outs = self.tap_model(x, training=True)
            y_pred, taps = outs[0], list(outs[1:])
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            local_loss = loss_module.unscale_loss_for_distribution(loss)
            batch = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            self._loss_tracker.update_state(local_loss, sample_weight=batch)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        pre = spec.split(taps)["pre"] if (capture and self.capture_activations) else []
        grads = tape.gradient(scaled_loss, variables + pre)
        grads, pre_grads = grads[: len(variables)], grads[len(variables):]
        old = [tf.identity(v) for v in variables] if (capture and self.capture_params) else None
        self.optimizer.apply_gradients(zip(grads, variables))

        finite = tf.math.is_finite(tf.cast(local_loss, tf.float32))
        first = self.ring.first_nonfinite
        first.assign(tf.where(tf.logical_and(first < 0, tf.logical_not(finite)), step, first))
        if capture:
            self._capture(step, local_loss, grads, pre_grads, old, taps)
        return y_pred

    def _capture(self, step, local_loss, grads, pre_grads, old, taps) -> None:
        spec = self.spec
        unscale = getattr(self.optimizer, "dynamic_scale", None)  # LossScaleOptimizer (mixed precision)
        fix = (lambda g: tf.cast(g, tf.float32) / tf.cast(unscale, tf.float32)) if unscale is not None else \
            (lambda g: tf.cast(g, tf.float32))
        grads = [fix(g) if g is not None else tf.zeros(v.shape) for g, v in zip(grads, self.trainable_variables)]
        pre_grads = [fix(g) for g in pre_grads]
        # Global-batch gradient: the per-replica losses are already divided by the replica count, so the
        # SUM of the replicas' gradients is the gradient of the global mean loss.
        grads = _all_reduce_sum(grads)
        n_rep = _num_replicas()
        loss_val = _all_reduce_sum(tf.cast(local_loss, tf.float32)) / n_rep
        if self.capture_params:
            p = param_statistics(grads, old, self.trainable_variables)
            gnorm = tf.sqrt(tf.reduce_sum(tf.square(p[:, 0])))
        else:
            p = tf.fill([len(spec.params), len(PARAM_STATS)], float("nan"))
            gnorm = tf.sqrt(tf.add_n([_sq(g) for g in grads]))
        if self.capture_activations and len(spec.blocks):
            b = block_statistics(spec, pre_grads, spec.split(taps))
        else:
            b = tf.fill([len(spec.blocks), len(BLOCK_STATS)], float("nan"))
        # A non-finite gradient also means divergence: on CPU, fused MatMul+BiasAdd+Relu kernels map NaN to 0,
        # so a ReLU net can keep a finite loss while its gradients and weights are already NaN.
        first = self.ring.first_nonfinite
        first.assign(tf.where(tf.logical_and(first < 0, tf.logical_not(tf.math.is_finite(gnorm))), step, first))
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        self.ring.write(step, tf.stack([loss_val, gnorm, lr]), p, b)


# --------------------------------------------------------------------------------------------- measure


def measure(model: keras.Model, batch: Any, loss: Any, *, training: bool = False) -> pd.DataFrame:
    """Statistics of one batch without training (no update, so update columns are NaN).

    Args:
        model: a functional model with tagged blocks (any zoo model).
        batch: ``(x, y)``.
        loss: a Keras loss (object, name or callable ``loss(y_true, y_pred)``).
        training: run layers in training mode (dropout, batch statistics).

    Returns:
        One row per trainable tensor (``depth, block, layer, param, role, size, grad_norm, weight_norm``)
        with the block's activation columns joined on by ``depth``, and the batch loss in ``attrs["loss"]``.
    """
    x, y = batch
    spec = make_spec(model)
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        outs = spec.tap_model(x, training=training)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        value = loss_fn(y, outs[0])
        value = tf.reduce_mean(value)
    taps = spec.split(list(outs[1:]))
    grads = tape.gradient(value, variables + taps["pre"])
    p = param_statistics([tf.cast(g, tf.float32) if g is not None else tf.zeros(v.shape)
                          for g, v in zip(grads[: len(variables)], variables)], None, variables).numpy()
    b = block_statistics(spec, [tf.cast(g, tf.float32) for g in grads[len(variables):]], taps).numpy()
    df = spec.params.copy()
    for i, name in enumerate(PARAM_STATS):
        df[name] = p[:, i]
    df["update_ratio"] = np.nan
    blocks = spec.blocks.copy()
    for i, name in enumerate(BLOCK_STATS):
        blocks[name] = b[:, i] if len(blocks) else []
    df = df.merge(blocks.drop(columns="block"), on="depth", how="left")
    df.attrs["loss"] = float(value)
    return df
