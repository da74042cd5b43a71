"""Activation statistics per block (``blocks.act_mean/std/saturation/dead``).

Glorot & Bengio 2010 (saturated sigmoid units stop the gradient); the dead-unit count follows the ReLU
literature. A unit is *saturated* where its activation derivative is below 5% of the activation's maximum
derivative (e.g. sigmoid' < 0.0125), *dead* when its derivative is zero for every example of the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ablations.instruments.base import Column, Finish, Instrument, Reducer, StepContext, tf

# The definition the report and the verdicts use.
SATURATION_FRACTION = 0.05


def max_derivative(act_layer: Any) -> float:
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


def _signature(layer: Any) -> Any:
    """Activation layers with equal signatures compute the same function (stateless, same config)."""
    if layer.weights:
        return id(layer)  # e.g. PReLU: its own slopes
    cfg = {k: v for k, v in layer.get_config().items() if k not in ("name", "trainable")}
    return (type(layer).__name__, repr(sorted(cfg.items(), key=lambda kv: kv[0])))


def _groups(tensors: list[Any], key: Any) -> list[list[int]]:
    """Indices of tensors grouped by (static non-batch shape, dtype, key): each group is stacked once."""
    out: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((tuple(t.shape[1:]), t.dtype, key(i)), []).append(i)
    return list(out.values())


class ActivationStats(Instrument):
    """Mean, std, saturated share and dead-unit share of each block's activation output, global batch.

    A plain ReLU, a sigmoid, a tanh and a Relu6 are read from their output, tapped from the forward pass,
    with the derivative TensorFlow's own gradient takes from it (ReluGrad: 1 where positive, else 0;
    SigmoidGrad: a (1 - a); TanhGrad: 1 - a^2; Relu6Grad: 0 < a < 6): no recomputation, and the block's
    pre-activation is not kept alive as a tap, so oneDNN still fuses MatMul+BiasAdd+activation; block by block
    for wide blocks on a CPU host, else stacked (:func:`per_block_on_this_host`, ``PER_BLOCK_MIN_ENTRIES``).
    Other activations are recomputed on their tapped input, stacked per shape and function (one layer call),
    before the update, so an activation with weights (PReLU) uses the forward pass's slopes. README: Capture
    overhead.
    """

    name = "activation"
    table = "blocks"
    order = 30
    columns = (
        Column("act_mean", "mean of the block's activation output"),
        Column("act_std", "standard deviation of the block's activation output"),
        Column("act_saturation", "share of activation entries with derivative < 5% of its maximum",
               "act_saturation/{block}"),
        Column("act_dead", "share of units whose derivative is zero for the whole batch", "act_dead/{block}"),
    )

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.rows = [row for row, v in enumerate(self.spec.views) if v.act is not None and v.act_input is not None]
        self.layers = [self.spec.views[r].act for r in self.rows]
        self.thresholds = [SATURATION_FRACTION * max_derivative(layer) for layer in self.layers]
        # Read from the tapped output (no input tap, no recomputation) where the output fixes the statistics.
        self.from_output = [output_slope(layer) is not None and self.spec.views[r].act_output is not None
                            for r, layer in zip(self.rows, self.layers)]

    def applies(self) -> bool:
        return bool(self.rows)

    def taps(self) -> dict[str, list[Any]]:
        views = [self.spec.views[r] for r in self.rows]
        return {"act_in": [v.act_input for v, out in zip(views, self.from_output) if not out],
                "act_out": [v.act_output for v, out in zip(views, self.from_output) if out]}

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        ins, outs = iter(ctx.taps.get("act_in", [])), iter(ctx.taps.get("act_out", []))
        tapped = [next(outs) if out else next(ins) for out in self.from_output]  # per row, in row order
        key = lambda i: (_signature(self.layers[i]), self.from_output[i])  # noqa: E731
        parts = [self._group(tapped, idx, red) for idx in _groups(tapped, key=key)]

        def finish(r: Any) -> dict[str, Any]:
            cols: dict[str, tuple[list[int], list[Any]]] = {c.name: ([], []) for c in self.columns}
            for rows, fn in parts:
                for name, values in fn(r).items():
                    cols[name][0].extend(rows)
                    cols[name][1].append(values)
            return {name: (rows, tf.concat(vals, axis=0)) for name, (rows, vals) in cols.items() if rows}

        return finish

    def _group(self, tapped: list[Any], idx: list[int], red: Reducer) -> tuple[list[int], Any]:
        out = self.from_output[idx[0]]
        wide = _entries_per_example(tapped[idx[0]]) >= PER_BLOCK_MIN_ENTRIES
        sums = self._per_block(tapped, idx) if out and wide and per_block_on_this_host() else \
            self._stacked(tapped, idx, out)
        h = [red.sums(t) for t in sums]
        k = len(idx)

        def fn(r: Any) -> dict[str, Any]:
            s, ss, n, sat, alive = (r(x) for x in h)
            mean = s / n
            dead = tf.reduce_mean(tf.cast(tf.equal(tf.reshape(alive, [k, -1]), 0.0), tf.float32), axis=1)
            return {"act_mean": mean, "act_std": tf.sqrt(tf.maximum(ss / n - tf.square(mean), 0.0)),
                    "act_saturation": sat / n, "act_dead": dead}

        return [self.rows[i] for i in idx], fn

    def _per_block(self, tapped: list[Any], idx: list[int]) -> tuple[Any, ...]:
        """Per-block sums (value, square, entries, saturated entries) and per-unit alive evidence (summed over
        replicas: > 0 on any replica means alive), from each block's own output tensor, block by block (on a
        CPU: :func:`per_block_on_this_host`)."""
        slope, thr = output_slope(self.layers[idx[0]]), self.thresholds[idx[0]]
        relu = is_plain_relu(self.layers[idx[0]])  # its slope is read from the output's sign
        s, half_ss, counted, alive = [], [], [], []  # counted: positive entries (ReLU), else saturated ones
        for i in idx:
            a = tf.cast(tf.stop_gradient(tapped[i]), tf.float32)
            s.append(tf.reduce_sum(a))
            half_ss.append(tf.nn.l2_loss(a))
            if relu:  # slope 1 where the output is positive, else 0 (below any threshold); a >= 0
                counted.append(tf.reduce_sum(tf.sign(a)))
                alive.append(tf.reduce_max(a, axis=0))
            else:
                d = slope(a)
                counted.append(tf.reduce_sum(tf.cast(d < thr, tf.float32)))
                alive.append(tf.reduce_max(d, axis=0))  # alive if any example has a nonzero slope
        n = tf.fill([len(idx)], tf.cast(tf.size(tapped[idx[0]]), tf.float32))
        # The scalar arithmetic once per group, not per block (the captured step runs every op it traces).
        sat = n - tf.stack(counted) if relu else tf.stack(counted)
        return tf.stack(s), 2.0 * tf.stack(half_ss), n, sat, tf.stack(alive)

    def _stacked(self, tapped: list[Any], idx: list[int], outputs: bool) -> tuple[Any, ...]:
        """As :meth:`_per_block`, on the group's tensors stacked: the outputs, or the inputs with the activation
        recomputed on them (one layer call)."""
        layer, thr = self.layers[idx[0]], self.thresholds[idx[0]]
        # A layer alone in its group (PReLU: own weights and an input spec that rejects a leading stack axis)
        # is called on its own input.
        z = tf.stop_gradient(tf.stack([tapped[i] for i in idx]) if len(idx) > 1 else tapped[idx[0]])
        if outputs:
            a = tf.cast(z, tf.float32)
            d = output_slope(layer)(a)
        else:
            a, d = _output_and_slope(layer, z)
        if len(idx) == 1:
            a, d = a[None], (d[None] if d is not None else None)
        ax = list(range(1, len(a.shape)))
        n = tf.fill([len(idx)], tf.cast(tf.size(a) // len(idx), tf.float32))
        if d is None:  # ReLU: the slope is 1 where the output is positive, else 0 (below any threshold)
            alive = tf.reduce_sum(tf.cast(a > 0, tf.float32), axis=1)  # per unit: examples with slope 1
            sat = n - (tf.reduce_sum(alive, axis=ax[:-1]) if len(ax) > 1 else alive)  # alive: batch axis gone
        else:
            # A unit is alive if any example has a nonzero slope: one max pass, no indicator tensor.
            alive = tf.reduce_max(d, axis=1)
            sat = tf.reduce_sum(tf.cast(d < thr, tf.float32), ax)
        return tf.reduce_sum(a, ax), tf.reduce_sum(tf.square(a), ax), n, sat, alive


# Block by block only where a block's tensor is big enough for TensorFlow to split its reductions (at batch 64:
# 16K entries for 256 units); narrow deep nets keep the stacked form, whose op count does not grow with depth
# (a width-16 ReZero MLP of 1000 blocks would otherwise run 7000 more ops a captured step).
PER_BLOCK_MIN_ENTRIES = 256


def _entries_per_example(t: Any) -> int:
    """Entries of one example of ``t`` (its static non-batch shape; 0 when unknown: stacked)."""
    dims = tuple(t.shape[1:])
    return 0 if None in dims else int(np.prod(dims, dtype=np.int64))


def per_block_on_this_host() -> bool:
    """Whether the output-based statistics run block by block (no GPU or TPU here) or on the stacked outputs.

    On 2 CPU cores TensorFlow splits each reduction over a stacked [blocks, batch, ...] tensor across both
    threads at 2-4x its one-thread CPU time, while one block's tensor is too small to split: block by block
    (and without the stacking copy) the benchmark MLP's 20 blocks took 0.37 ms instead of 0.90 ms of CPU alone,
    and its captured step 0.2 ms less (README: Capture overhead). On an accelerator each op is a kernel
    launch, so the stacked form's eight launches beat seven per block.
    """
    return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def is_plain_relu(layer: Any) -> bool:
    """``max(z, 0)`` exactly: an ``Activation('relu')`` or a ``ReLU()`` layer with its defaults."""
    import keras

    if isinstance(layer, keras.layers.ReLU):
        cfg = layer.get_config()
        return cfg.get("max_value") is None and not cfg.get("negative_slope") and not cfg.get("threshold")
    return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.relu


def _sigmoid_slope(a: Any) -> Any:
    return a * (1.0 - a)  # SigmoidGrad's form: >= 0 for every float32 sigmoid output


def _tanh_slope(a: Any) -> Any:
    return 1.0 - tf.square(a)  # TanhGrad's form: >= 0, |tanh| <= 1 in float32


def _relu6_slope(a: Any) -> Any:
    # Relu6Grad's rule (0 < z < 6), read from the output: 0 < a < 6 exactly where 0 < z < 6.
    return tf.cast(tf.logical_and(a > 0.0, a < 6.0), tf.float32)


def _is_relu6(layer: Any) -> bool:
    """``min(max(z, 0), 6)`` as TensorFlow's Relu6 (MobileNet): ``ReLU(max_value=6)`` or ``Activation('relu6')``.
    Other caps clip after the ReLU, whose gradient also passes at the cap itself: recomputed from the input."""
    import keras

    if isinstance(layer, keras.layers.ReLU):
        cfg = layer.get_config()
        return cfg.get("max_value") == 6 and not cfg.get("negative_slope") and not cfg.get("threshold")
    return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.relu6


def output_slope(layer: Any) -> Any:
    """``a -> |derivative|`` from the activation's output for the activations whose output fixes it (``a ->
    None`` for a plain ReLU: its statistics read the output's sign), else None (recomputed from the input)."""
    import keras

    if is_plain_relu(layer):
        return lambda a: None
    if _is_relu6(layer):
        return _relu6_slope
    fn = getattr(layer, "activation", None) if isinstance(layer, keras.layers.Activation) else None
    return {keras.activations.sigmoid: _sigmoid_slope, keras.activations.tanh: _tanh_slope}.get(fn)


def _output_and_slope(layer: Any, z: Any) -> tuple[Any, Any]:
    """(the layer's output on ``z``, |its derivative|) in float32; the derivative is None for a plain ReLU,
    whose statistics read it from the output's sign (four fewer passes over the stacked activations)."""
    if is_plain_relu(layer):
        return tf.cast(layer(z), tf.float32), None
    with tf.GradientTape() as tape:
        tape.watch(z)
        a = layer(z)  # the block's activation output, recomputed: no second stacked copy of the taps
    return tf.cast(a, tf.float32), tf.abs(tf.cast(tape.gradient(a, z), tf.float32))
