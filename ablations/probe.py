"""In-graph gradient statistics: a ``train_step`` that records layer-wise statistics into a device ring buffer.

The probe computes, for every captured step and inside the compiled step (no per-step host round trip):

* per trainable tensor (``params.parquet``): L2 norm of the gradient, of the weight before the update, of the
  applied update (whatever the optimizer did, clipping included) and their ratio;
* per tagged block (``blocks.parquet``): the L2 norm of dL/d(pre-activation) of the block's first linear layer
  (Glorot & Bengio 2010 show it vanishes where weight gradients do not), and the mean, std, saturated
  fraction and dead-unit fraction of the block's activation, and where the architecture has them the
  residual branch/skip norm ratio, the highway gate mean, ReZero's alpha and stochastic depth's active share;
* per step (``history.parquet``): loss, global gradient norm and learning rate;
* optionally (``grad_hist.parquet``): per block, a histogram of log10|dL/dW| over the block's kernels.

Statistic groups are switched separately (``capture.params``, ``updates``, ``activations``, ``histograms``):
gradient norms alone cost one L2Loss per tensor; weight and update norms need the pre-update weights.

Gradients are the global-batch gradients: under a multi-replica strategy a copy is all-reduced for the
statistics only (the optimizer reduces its own), and loss-scaled gradients are unscaled first. Steps that
are not captured run a plain step (a ``tf.cond`` picks the branch), so ``capture.every: 16`` costs almost
nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pandas as pd
import tensorflow as tf
import keras
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.losses import loss as loss_module

import zoo
from ablations.statistics import (BLOCK_STATS, HIST_BINS, PARAM_STATS, STEP_STATS,  # noqa: F401 - re-exported
                                  all_reduce_sum, block_statistics, global_norm, gradient_histograms,
                                  num_replicas, off_blocks, param_skip, param_statistics, sq_sums)

# A unit is saturated where its activation derivative is below this fraction of the activation's maximum
# derivative (e.g. sigmoid' < 0.0125): the definition the report and the verdicts use.
SATURATION_FRACTION = 0.05


def max_derivative(act_layer: keras.layers.Layer) -> float:
    """Largest derivative of an element-wise activation layer, found numerically on [-20, 20].

    Layers with weights (PReLU: one slope per unit) take their input's shape: every unit sees the range.
    """
    z = np.linspace(-20.0, 20.0, 40001)
    if act_layer.weights:
        features = tuple(act_layer.input.shape[1:])
        n = int(np.clip(4_000_000 // max(1, int(np.prod(features))), 101, 40001))
        z = np.broadcast_to(np.linspace(-20.0, 20.0, n).reshape(n, *([1] * len(features))), (n, *features))
    z = tf.constant(z, dtype=act_layer.compute_dtype)
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
    # Scalar weights read as block statistics: column -> [(block row, variable)] (ReZero alpha, the
    # stochastic-depth layer's `active`, which its forward pass writes).
    scalars: dict[str, list[tuple[int, Any]]] = dataclasses.field(default_factory=dict)

    def param_block_rows(self) -> np.ndarray:
        """Block row of every parameter (-1 for stem, head and anything outside a tagged block)."""
        rows = {d: i for i, d in enumerate(self.blocks["depth"])}
        return np.array([rows.get(d, -1) if role == "block" else -1
                         for role, d in zip(self.params["role"], self.params["depth"])], np.int32)

    def hist_groups(self) -> list[tuple[int, list[int]]]:
        """``(block row, [param row, ...])``: the kernel tensors of each block (gradient histograms)."""
        rows = {d: i for i, d in enumerate(self.blocks["depth"])}
        out: dict[int, list[int]] = {}
        for i, (role, depth, param) in enumerate(zip(self.params["role"], self.params["depth"], self.params["param"])):
            if role == "block" and str(param).endswith("kernel") and depth in rows:
                out.setdefault(rows[depth], []).append(i)
        return sorted(out.items())

    @property
    def n_pre(self) -> int:
        return len(self.pre_rows)

    def split(self, taps: list[Any]) -> dict[str, list[Any]]:
        """Splits the tap outputs into their groups (pre, act_in, skip, branch, gate)."""
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
                         size=int(np.prod(v.shape)), path=v.path))
    params = pd.DataFrame(rows, columns=["depth", "block", "layer", "param", "role", "size", "path"])
    # Layers with several tensors of one name (attention: query/key/value/output kernels) keep the path
    # below the layer, e.g. "query/kernel", so every row names one tensor.
    dup = params.duplicated(["layer", "param"], keep=False)
    params.loc[dup, "param"] = params.loc[dup, "path"].str.split("/", n=1).str[1]
    params = params.drop(columns="path")

    blocks = zoo.blocks(model)
    block_df = pd.DataFrame({"depth": [b.index for b in blocks], "block": [b.prefix for b in blocks]})
    pre, pre_rows, act_in, act_layers, act_rows, thresholds = [], [], [], [], [], []
    skip, branch, res_rows, gate, gate_rows = [], [], [], [], []
    scalars: dict[str, list[tuple[int, Any]]] = {}
    if activations:
        for row, b in enumerate(blocks):
            if b.linear is not None:
                pre.append(b.linear.output)
                pre_rows.append(row)
            if b.act is not None:
                act_in.append(b.act.input)
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
            for layer in b.layers.values():
                for w in layer.weights:
                    if w.name in ("alpha", "active") and tuple(w.shape) == ():
                        scalars.setdefault(w.name, []).append((row, w))
    taps, groups = [], {}
    for key, group in [("pre", pre), ("act_in", act_in), ("skip", skip),
                       ("branch", branch), ("gate", gate)]:
        groups[key] = (len(taps), len(taps) + len(group))
        taps.extend(group)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # same structure as the data
    tap_model = keras.Model(inputs, [model.outputs[0], *taps], name=f"{model.name}_taps")
    return ProbeSpec(params, block_df, tap_model, groups, pre_rows, act_layers, act_rows, thresholds, res_rows,
                     gate_rows, scalars)


class _Ring:
    """Device-side ring buffer of captured statistics, drained by :class:`DrainCallback`.

    Kept out of Keras' tracking (a plain object) so it never enters the saved model.
    """

    def __init__(self, capacity: int, n_params: int, n_blocks: int, time_shape: tuple[int, int] | None = None,
                 histograms: bool = False):
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA  # replicas hold identical (all-reduced) values
        sync = tf.VariableSynchronization.ON_WRITE
        kw = dict(trainable=False, aggregation=agg, synchronization=sync)
        self.capacity = capacity
        self.count = tf.Variable(tf.constant(0, tf.int64), name="probe_count", **kw)
        self.steps = tf.Variable(tf.zeros([capacity], tf.int64), name="probe_steps", **kw)
        self.scalars = tf.Variable(tf.zeros([capacity, len(STEP_STATS)]), name="probe_scalars", **kw)
        self.params = tf.Variable(tf.zeros([capacity, n_params, len(PARAM_STATS)]), name="probe_params", **kw)
        self.blocks = tf.Variable(tf.zeros([capacity, n_blocks, len(BLOCK_STATS)]), name="probe_blocks", **kw)
        # Through-time gradient norms [layers, T] of recurrent models (time_grads.parquet).
        self.time = tf.Variable(tf.zeros([capacity, *time_shape]), name="probe_time", **kw) if time_shape else None
        # Per-block gradient histograms (capture.histograms).
        self.hist = tf.Variable(tf.zeros([capacity, n_blocks, HIST_BINS + 1]), name="probe_hist", **kw) \
            if histograms else None
        # First optimizer step whose loss was NaN/Inf (-1: none yet): checked every step, read at drains.
        self.first_nonfinite = tf.Variable(tf.constant(-1, tf.int64), name="probe_nonfinite", **kw)

    def write(self, step: tf.Tensor, scalars: tf.Tensor, params: tf.Tensor, blocks: tf.Tensor,
              due: tf.Tensor | None = None, time: tf.Tensor | None = None, hist: tf.Tensor | None = None) -> None:
        """Appends one capture; with ``due`` (a bool tensor) only when it is true."""
        idx = tf.reshape(self.count % self.capacity, [1, 1])
        pairs = [(self.steps, tf.reshape(step, [1])), (self.scalars, scalars[None]), (self.params, params[None]),
                 (self.blocks, blocks[None])]
        if self.time is not None and time is not None:
            pairs.append((self.time, time[None]))
        if self.hist is not None and hist is not None:
            pairs.append((self.hist, hist[None]))
        for var, value in pairs:
            if 0 in var.shape:  # e.g. no tagged blocks (a model from outside the zoo): nothing to store
                continue
            if num_replicas() > 1:  # mirrored variables have no scatter_nd_update (NotImplementedError)
                new = tf.tensor_scatter_nd_update(var, idx, value)
                var.assign(new if due is None else tf.where(due, new, var))
            else:
                var.scatter_nd_update(idx, value)
        self.count.assign_add(1 if due is None else tf.cast(due, tf.int64))

    def read(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k).numpy() for k in ("count", "steps", "scalars", "params", "blocks",
                                                        "first_nonfinite")}
        if self.time is not None:
            out["time"] = self.time.numpy()
        if self.hist is not None:
            out["hist"] = self.hist.numpy()
        return out


class ProbedModel(keras.Model):
    """Wraps a zoo model; its ``train_step`` trains exactly like Keras' and records statistics.

    Args:
        net: the functional model to train (saved as ``final.keras``; the wrapper is never saved).
        every: capture every ``every`` optimizer steps.
        capacity: ring buffer slots (captures held on device between drains).
        params: capture per-tensor gradient norms.
        updates: capture per-tensor weight and applied-update norms (needs a pre-update copy of the weights
            on captured steps: two more passes over the weights).
        activations: capture per-block statistics.
        histograms: capture per-block histograms of log10|dL/dW| over the block's kernels (one more pass
            over the gradients, with a log per entry: off by default).
        time: for recurrent models, capture ||dL/dh_t|| of every recurrent layer and step t (one extra
            forward/backward pass through a weight-sharing view, on captured steps only; see
            :mod:`ablations.timegrad`).
    """

    def __init__(self, net: keras.Model, *, every: int = 1, capacity: int = 64, params: bool = True,
                 updates: bool = True, activations: bool = True, time: bool = True, histograms: bool = False,
                 **kwargs: Any):
        super().__init__(name=f"probed_{net.name}", **kwargs)
        spec = make_spec(net, activations=activations)
        self.tap_model = spec.tap_model
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "spec", spec)
        probe = None
        if time and any((zoo.parse_layer_name(l.name) or (0, ""))[1] == "rnn" for l in net.layers):
            from ablations.timegrad import time_probe_view

            probe = time_probe_view(net)  # shares the cells' variables; kept out of Keras' tracking
        object.__setattr__(self, "time_probe", probe)
        time_shape = (len(probe.names), max(probe.lengths)) if probe else None
        object.__setattr__(self, "ring", _Ring(capacity, len(spec.params), len(spec.blocks), time_shape,
                                               histograms=histograms))
        self.capture_histograms = histograms
        self.every = int(every)
        self.capture_params = params
        self.capture_updates = params and updates
        self.capture_activations = activations

    def call(self, inputs: Any, training: bool = False) -> Any:
        outs = self.tap_model(inputs, training=training)
        return outs[0] if isinstance(outs, (list, tuple)) else outs

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        # Under a tf.distribute strategy Keras pulls one batch from a fresh iterator to build the model, which
        # advances a reshuffling dataset's seed: the arm would then see other batches than under the default
        # strategy. Building from the dataset's element spec keeps the data order strategy-independent.
        adapter = getattr(iterator, "data_adapter", None)
        if data_batch is None and adapter is not None:
            spec = adapter.get_tf_dataset().element_spec
            data_batch = tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), spec)
            iterator = None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        if self.every == 1:
            y_pred = self._step(x, y, sample_weight, step, capture=True)
        elif num_replicas() > 1:
            # Under several replicas a tf.cond cannot hold the step's sync points (gradient all-reduce, mirrored
            # variable writes): capture every step and record only the due ones.
            y_pred = self._step(x, y, sample_weight, step, capture=True, due=tf.equal(step % self.every, 0))
        else:
            y_pred = tf.cond(
                tf.equal(step % self.every, 0),
                lambda: self._step(x, y, sample_weight, step, capture=True),
                lambda: self._step(x, y, sample_weight, step, capture=False),
            )
        return self._worker_logs(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def test_step(self, data: Any) -> dict[str, Any]:
        return self._worker_logs(super().test_step(data))

    def _worker_logs(self, logs: dict[str, Any]) -> dict[str, Any]:
        # Keras 3 averages logs over workers with strategy.reduce(MEAN, v, axis=0), which fails on scalars under
        # MultiWorkerMirroredStrategy (tensorflow/tensorflow#72388): give them that axis.
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def _step(self, x: Any, y: Any, sample_weight: Any, step: tf.Tensor, capture: bool,
              due: tf.Tensor | None = None) -> tf.Tensor:
        spec = self.spec
        with tf.GradientTape() as tape:
            outs = self.tap_model(x, training=True)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]  # no taps: Keras returns the bare output
            y_pred, taps = outs[0], list(outs[1:])
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            local_loss = loss_module.unscale_loss_for_distribution(loss)
            batch = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            self._loss_tracker.update_state(local_loss, sample_weight=batch)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        split = spec.split(taps) if (capture and self.capture_activations) else None
        pre = split["pre"] if split else []
        grads = tape.gradient(scaled_loss, variables + pre)
        grads, pre_grads = grads[: len(variables)], grads[len(variables):]
        # Reads, not copies: a resource variable updated in place while a read of it is alive is copied
        # first (copy-on-write), so these keep the pre-update values at the cost of that one copy.
        old = [tf.convert_to_tensor(v) for v in variables] if (capture and self.capture_updates) else None
        # Through time, before the update: the same weights as every other statistic of this step.
        time_norms = self._time_norms(x, y, sample_weight) if (capture and self.time_probe is not None) else None
        # The loss scale that scaled these gradients: apply_gradients may change it (LossScaleOptimizer).
        scale = getattr(self.optimizer, "dynamic_scale", None)
        scale = tf.identity(scale) if (capture and scale is not None) else None
        # Block statistics before the update too: an activation with weights (PReLU) is recomputed for its
        # derivative, and must be the one the forward pass used.
        off = off_blocks(spec) if capture else None  # before the update: ReZero's alpha moves in it
        blocks = self._block_stats(pre_grads, split, scale, off) if capture else None
        self.optimizer.apply_gradients(zip(grads, variables))

        bad = tf.logical_not(tf.math.is_finite(tf.cast(local_loss, tf.float32)))
        if capture:
            gnorm = self._capture(step, local_loss, grads, old, blocks, scale=scale, due=due, time=time_norms, off=off)
            # A non-finite gradient also means divergence: on CPU, fused MatMul+BiasAdd+Relu kernels map NaN to 0,
            # so a ReLU net can keep a finite loss while its gradients and weights are already NaN.
            bad = tf.logical_or(bad, tf.logical_not(tf.math.is_finite(gnorm)))
        first = self.ring.first_nonfinite  # one write per step, captured or not
        first.assign(tf.where(tf.logical_and(first < 0, bad), step, first))
        return y_pred

    def _time_norms(self, x: Any, y: Any, sample_weight: Any) -> tf.Tensor:
        """[layers, T] global-batch ||dL/dh_t|| through the zero-eps view (NaN-padded to the longest T)."""
        probe = self.time_probe
        eps = probe.zeros(tf.shape(x)[0])
        with tf.GradientTape() as tape:
            tape.watch(eps)
            pred = probe.view([x, *eps], training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=pred, sample_weight=sample_weight, training=True)
        grads = tape.gradient(loss, eps)
        t_max = max(probe.lengths)
        rows = []
        for g, t in zip(grads, probe.lengths):
            sq = tf.reduce_sum(tf.square(tf.cast(g, tf.float32)), axis=[0, 2])
            rows.append(tf.pad(sq, [[0, t_max - t]], constant_values=float("nan")) if t < t_max else sq)
        return tf.sqrt(all_reduce_sum(tf.stack(rows)))

    @staticmethod
    def _unscaler(scale: tf.Tensor | None) -> Callable[[tf.Tensor], tf.Tensor]:
        """float32 cast, dividing by LossScaleOptimizer's scale (mixed precision) when there is one."""
        if scale is None:
            return lambda g: tf.cast(g, tf.float32)
        return lambda g: tf.cast(g, tf.float32) / tf.cast(scale, tf.float32)

    def _block_stats(self, pre_grads: list[tf.Tensor], split: dict[str, list[Any]] | None,
                     scale: tf.Tensor | None, off: tf.Tensor | None = None) -> tf.Tensor:
        spec = self.spec
        if split is None or not len(spec.blocks):
            return tf.fill([len(spec.blocks), len(BLOCK_STATS)], float("nan"))
        fix = self._unscaler(scale)
        return block_statistics(spec, [fix(g) for g in pre_grads], split, off)

    def _capture(self, step, local_loss, grads, old, blocks, scale=None, due=None, time=None,
                 off=None) -> tf.Tensor:
        """Computes and records the step's per-tensor and per-step statistics; returns the global grad norm."""
        spec = self.spec
        fix = self._unscaler(scale)
        grads = [fix(g) if g is not None else tf.zeros(v.shape) for g, v in zip(grads, self.trainable_variables)]
        # Global-batch gradient: the per-replica losses are already divided by the replica count, so the
        # SUM of the replicas' gradients is the gradient of the global mean loss.
        grads = all_reduce_sum(grads)
        n_rep = num_replicas()
        loss_val = all_reduce_sum(tf.cast(local_loss, tf.float32)) / n_rep
        if self.capture_params:
            new = self.trainable_variables if old is not None else None
            p = param_statistics(grads, old, new, skip=param_skip(spec, off))
            gnorm = global_norm(p[:, 0])
        else:
            p = tf.fill([len(spec.params), len(PARAM_STATS)], float("nan"))
            gnorm = tf.sqrt(tf.reduce_sum(sq_sums(grads)))
        hist = gradient_histograms(grads, spec.hist_groups(), len(spec.blocks)) if self.capture_histograms else None
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        self.ring.write(step, tf.stack([loss_val, gnorm, lr]), p, blocks, due=due, time=time, hist=hist)
        return gnorm


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
                          for g, v in zip(grads[: len(variables)], variables)], new=variables).numpy()
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
