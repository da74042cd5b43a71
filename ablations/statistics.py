"""In-graph statistic kernels of the probe: norms, block statistics, parameter statistics, histograms.

Pure functions of tensors (and of a :class:`ablations.probe.ProbeSpec`), called inside the compiled train step
by :class:`ablations.probe.ProbedModel` and eagerly by :func:`ablations.measure`. On CPU their cost is memory
traffic and op count, so each norm is one L2Loss kernel and per-element passes are shared across blocks by
stacking (README, Capture overhead, has the profile).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
import keras

if TYPE_CHECKING:  # the spec is built by the probe, which imports this module
    from ablations.probe import ProbeSpec

# Statistic columns, in buffer order.
PARAM_STATS = ("grad_norm", "weight_norm", "update_norm")
# branch_ratio: ||residual branch|| / ||skip|| at the block's `add` layer; gate_mean: mean of a `gate` layer's
# output (highway transform gate); alpha: a ReZero block's residual weight; active: the fraction of the batch
# for which a stochastic-depth block's branch was on (0 or 1 in batch mode). NaN for blocks without them.
BLOCK_STATS = ("act_grad_norm", "act_mean", "act_std", "act_saturation", "act_dead", "branch_ratio", "gate_mean",
               "alpha", "active")
STEP_STATS = ("loss", "global_grad_norm", "lr")

# Gradient histograms (capture.histograms): per block, counts of |dL/dW| over the block's kernels in binary
# bins (bin k: [2^(HIST_EXP_LO + k), 2^(HIST_EXP_LO + k + 1)), about 0.3 decades each) from ~7e-21 to 256, read
# straight off the float32 exponent bits (no log per entry); entries outside fall into the end bins (NaN/Inf
# into the top one) and exact zeros get a count of their own.
HIST_EXP_LO, HIST_EXP_HI = -67, 7
HIST_BINS = HIST_EXP_HI - HIST_EXP_LO + 1
HIST_RANGE = (HIST_EXP_LO * math.log10(2.0), (HIST_EXP_HI + 1) * math.log10(2.0))  # log10 of the outer edges


def _half_sq(t: tf.Tensor) -> tf.Tensor:
    """sum(t**2) / 2 in one kernel (L2Loss), in float32 (float64 tensors are reduced in float64 first).

    One op per tensor, no squared copy: on CPU these reductions are bound by memory traffic and op count, and
    for a large tensor a single L2Loss beats Square + Sum and a stacked reduction (README: capture overhead).
    """
    if t.dtype == tf.float64:
        return tf.cast(tf.nn.l2_loss(t), tf.float32)
    return tf.nn.l2_loss(tf.cast(t, tf.float32))


# Tensors of at most this many entries are stacked with their equals (same shape and dtype) and reduced in one
# op: for them the op, not the data, is the cost (biases, ReZero alphas, every kernel of a narrow deep net).
SMALL_TENSOR = 4096


def _size(t: Any) -> int | None:
    shape = tuple(t.shape)
    return None if None in shape else int(np.prod(shape, dtype=np.int64))


def sq_sums(tensors: list[Any], scale: float | None = None) -> tf.Tensor:
    """[len(tensors)] float32 sums of squares of ``t * scale`` (additive over replicas).

    Large tensors get one L2Loss each; small ones of equal shape and dtype share a stack and one reduction.
    """
    singles: list[int] = []
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        n = _size(t)
        if n is not None and n <= SMALL_TENSOR:
            groups.setdefault((tuple(t.shape), tf.as_dtype(t.dtype)), []).append(i)
        else:
            singles.append(i)
    for key in [k for k, idx in groups.items() if len(idx) == 1]:
        singles.extend(groups.pop(key))
    singles.sort()

    def scaled(t: Any) -> tf.Tensor:
        t = tf.convert_to_tensor(t)  # Keras variables: their value
        t = t if t.dtype == tf.float64 else tf.cast(t, tf.float32)  # float16 would overflow when scaled
        return t if scale is None else t * tf.constant(scale, t.dtype)  # a power of two: exact

    parts, order = [], []
    if singles:
        parts.append(2.0 * tf.stack([_half_sq(scaled(tensors[i])) for i in singles]))
        order.extend(singles)
    for (shape, _), idx in groups.items():
        x = scaled(tf.stack([tf.convert_to_tensor(tensors[i]) for i in idx]))
        parts.append(tf.cast(tf.reduce_sum(tf.square(x), axis=list(range(1, len(shape) + 1))), tf.float32))
        order.extend(idx)
    flat = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
    return flat if order == list(range(len(tensors))) else tf.gather(flat, np.argsort(order))


# A float32 sum of squares below this has lost digits to underflow: entries below ~1e-19 square to subnormals
# or zero, exactly where a deep plain net's first-layer gradients sit.
TINY_SQ = 1e-30
# Tiny tensors are rescaled by 2**RESCUE_EXP (exact in binary floating point): norms stay exact down to
# entries of ~2**-127 (6e-39, float32's subnormal range).
RESCUE_EXP = 64


def norms(tensors: list[tf.Tensor], skip: tf.Tensor | None = None) -> tf.Tensor:
    """[len(tensors)] float32 L2 norms that stay exact for vanishing tensors (down to float32's ~1e-38).

    The fast path is one L2Loss per tensor. When any sum of squares is tiny, all tensors are recomputed as
    ``||t * 2**64|| / 2**64`` (two more passes), so a gradient of 1e-25 reads 1e-25, not 0. Healthy training
    never takes that branch; all-zero tensors (dead layers) take it on every captured step.
    """
    sq = sq_sums(tensors)
    tiny = sq < TINY_SQ
    if skip is not None:  # known zeros (a switched-off block's gradients) must not pay for the rescue
        tiny = tf.logical_and(tiny, tf.logical_not(skip))

    def rescaled() -> tf.Tensor:
        # Exact power-of-two scaling: no max pass, no division, two ops per large tensor (a per-tensor max
        # and divide made this branch half the trace time of a deep model's train step). A tiny tensor has
        # every |entry| < 1e-15, so scaled its sum of squares stays below ~3e8.
        rescued = tf.sqrt(sq_sums(tensors, scale=2.0 ** RESCUE_EXP)) * 2.0 ** -RESCUE_EXP
        return tf.where(tiny, rescued, tf.sqrt(sq))

    return _unlowered_cond(tf.reduce_any(tiny), rescaled, lambda: tf.sqrt(sq))


def _unlowered_cond(pred: tf.Tensor, true_fn: Any, false_fn: Any) -> tf.Tensor:
    """``tf.cond`` kept as one functional ``If`` op in a graph.

    Lowered (TensorFlow's default in graphs), every tensor the branches read gets a Switch node that runs on
    every step: for the ~140 tensors of the norms that cost 6-17% of a step of the benchmark MLP (measured);
    one ``If`` call costs about nothing. Eager code and XLA take the cond as it is.
    """
    if tf.executing_eagerly():
        return tf.cond(pred, true_fn, false_fn)
    from tensorflow.core.framework import attr_value_pb2

    graph = tf.compat.v1.get_default_graph()
    start = len(graph.get_operations())
    out = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[start:]:
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))  # noqa: SLF001
    return out


def global_norm(norms: tf.Tensor) -> tf.Tensor:
    """L2 norm of a vector of norms, scaled by its max so tiny entries do not underflow when squared."""
    m = tf.reduce_max(norms)
    m = tf.where(m > 0, m, tf.ones_like(m))
    return m * tf.sqrt(tf.reduce_sum(tf.square(norms / m)))


def all_reduce_sum(values: Any) -> Any:
    """SUM over replicas inside a replica context; identity with one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def num_replicas() -> int:
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def _signature(layer: keras.layers.Layer) -> Any:
    """Activation layers with equal signatures compute the same function (stateless, same config)."""
    if layer.weights:
        return id(layer)  # e.g. PReLU: its own slopes
    cfg = {k: v for k, v in layer.get_config().items() if k not in ("name", "trainable")}
    return (type(layer).__name__, repr(sorted(cfg.items(), key=lambda kv: kv[0])))


def _groups(tensors: list[tf.Tensor], key=lambda i: None) -> list[list[int]]:
    """Indices of tensors grouped by (static non-batch shape, dtype, key): each group is stacked once."""
    out: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((tuple(t.shape[1:]), t.dtype, key(i)), []).append(i)
    return list(out.values())


def block_statistics(spec: ProbeSpec, pre_grads: list[tf.Tensor], taps: dict[str, list[tf.Tensor]],
                     off: tf.Tensor | None = None) -> tf.Tensor:
    """Returns a [n_blocks, len(BLOCK_STATS)] float32 tensor (NaN where a block lacks the tensor).

    Args:
        spec: the probe spec.
        pre_grads: dL/d(pre-activation) per pre-activation tap.
        taps: the forward tap tensors by group (:meth:`ProbeSpec.split`).
        off: [n_blocks] bool from :func:`off_blocks` (their zero dL/dz skip the underflow rescue).

    Norms are one L2Loss per tensor. Activation statistics need several element-wise passes (derivative,
    thresholds, counts), so blocks whose activations share a shape and function are stacked and reduced
    together: a deep net costs a handful of ops, not a handful per block (on CPU the op count, not the
    arithmetic, dominates). Sums are formed per replica and all-reduced once, so the values are those of
    the global batch.
    """
    n_blocks = len(spec.blocks)
    pieces: list[tf.Tensor] = []  # per-replica sums, all-reduced together
    finish = []  # (slice sizes, function of the reduced slices -> [(column, rows, values)])

    def add(local: list[tf.Tensor], fn) -> None:
        pieces.extend(tf.reshape(x, [-1]) for x in local)
        finish.append(([int(np.prod(x.shape)) for x in local], fn))

    if pre_grads:
        if num_replicas() == 1:  # norms pass through the (identity) reduction, rescued from underflow
            skip = tf.gather(off, spec.pre_rows) if off is not None else None
            add([norms(pre_grads, skip)], lambda r: [(0, spec.pre_rows, r[0])])
        else:  # sums of squares add over replicas
            add([sq_sums(pre_grads)], lambda r: [(0, spec.pre_rows, tf.sqrt(r[0]))])

    act_in = taps["act_in"]
    for idx in _groups(act_in, key=lambda i: _signature(spec.act_layers[i])):
        layer, thr = spec.act_layers[idx[0]], spec.act_thresholds[idx[0]]
        # One layer call on the stacked inputs; a layer alone in its group (PReLU: own weights and an input
        # spec that rejects a leading stack axis) is called on its own input.
        z = tf.stop_gradient(tf.stack([act_in[i] for i in idx]) if len(idx) > 1 else act_in[idx[0]])
        with tf.GradientTape() as tape:
            tape.watch(z)
            a = layer(z)  # the block's activation output, recomputed: no second stacked copy of the taps
        d = tf.abs(tf.cast(tape.gradient(a, z), tf.float32))
        a = tf.cast(a, tf.float32)
        if len(idx) == 1:
            a, d = a[None], d[None]
        ax = list(range(1, len(a.shape)))
        n = tf.fill([len(idx)], tf.cast(tf.size(a) // len(idx), tf.float32))
        alive = tf.reduce_sum(tf.cast(d > 0, tf.float32), axis=1)  # per unit: examples with a nonzero slope
        local = [tf.reduce_sum(a, ax), tf.reduce_sum(tf.square(a), ax), n,
                 tf.reduce_sum(tf.cast(d < thr, tf.float32), ax), alive]
        rows = [spec.act_rows[i] for i in idx]

        def act_fn(r, rows=rows, k=len(idx)):
            s, ss, n, sat, alive = r
            mean = s / n
            dead = tf.reduce_mean(tf.cast(tf.equal(tf.reshape(alive, [k, -1]), 0.0), tf.float32), axis=1)
            return [(1, rows, mean), (2, rows, tf.sqrt(tf.maximum(ss / n - tf.square(mean), 0.0))),
                    (3, rows, sat / n), (4, rows, dead)]

        add(local, act_fn)

    if taps["skip"]:
        k = len(taps["skip"])
        add([sq_sums(taps["branch"] + taps["skip"])],
            lambda r, k=k: [(5, spec.res_rows, tf.sqrt(r[0][:k] / r[0][k:]))])

    gate = taps["gate"]
    if gate:
        add([tf.stack([tf.reduce_sum(tf.cast(g, tf.float32)) for g in gate]),
             tf.stack([tf.cast(tf.size(g), tf.float32) for g in gate])],
            lambda r: [(6, spec.gate_rows, r[0] / r[1])])

    n_rep = num_replicas()
    for name, pairs in spec.scalars.items():
        # Replicas hold the same alpha; each draws its own stochastic-depth mask: the mean over replicas.
        add([tf.stack([tf.cast(tf.convert_to_tensor(v), tf.float32) for _, v in pairs])],
            lambda r, col=BLOCK_STATS.index(name), rows=[row for row, _ in pairs]: [(col, rows, r[0] / n_rep)])

    if not pieces or not n_blocks:
        return tf.fill([n_blocks, len(BLOCK_STATS)], float("nan"))
    total = all_reduce_sum(tf.concat(pieces, axis=0))
    parts = tf.split(total, [s for sizes, _ in finish for s in sizes])
    indices, values = [], []
    k = 0
    for sizes, fn in finish:
        for col, rows, vals in fn(parts[k: k + len(sizes)]):
            indices.extend([row, col] for row in rows)
            values.append(vals)
        k += len(sizes)
    return tf.tensor_scatter_nd_update(tf.fill([n_blocks, len(BLOCK_STATS)], float("nan")),
                                       tf.constant(indices, tf.int32), tf.concat(values, axis=0))


def param_statistics(grads: list[tf.Tensor], old: list[tf.Tensor] | None = None,
                     new: list[Any] | None = None, skip: tf.Tensor | None = None) -> tf.Tensor:
    """Returns a [n_params, 3] float32 tensor: grad, weight (before the update) and update norms.

    Args:
        grads: the gradients (float32).
        old: the weights before the update (None: weight norms from ``new``, update norms NaN).
        new: the weights after the update (None with ``old`` None: weight and update norms NaN).
        skip: [n] bool, tensors whose gradient (and update) is zero by design this step (:func:`off_blocks`):
            their exact zeros skip the underflow rescue.
    """
    n = len(grads)
    columns = [list(grads)]
    skips = [skip]
    w_src = old if old is not None else new
    if w_src is not None:
        columns.append(list(w_src))
        skips.append(tf.zeros_like(skip) if skip is not None else None)
    if old is not None and new is not None:
        # Subtract in the variable's dtype, then cast: casting first would round float64 weights to float32
        # and swamp a small update with the rounding error of the weights.
        columns.append([tf.cast(v, o.dtype) - o for v, o in zip(new, old)])
        skips.append(skip)
    k = len(columns)
    # Row-major [n, k] order (tensor by tensor), so the result needs no transpose (an MKL transpose of the
    # [k, n] table took 0.2 ms a step on a depth-250 net).
    tensors = [col[i] for i in range(n) for col in columns]
    flat_skip = tf.reshape(tf.stack(skips, axis=1), [-1]) if skip is not None else None
    out = tf.reshape(norms(tensors, flat_skip), [n, k])
    if k < len(PARAM_STATS):
        out = tf.concat([out, tf.fill([n, len(PARAM_STATS) - k], float("nan"))], axis=1)
    return out


def gradient_histograms(grads: list[tf.Tensor], groups: list[tuple[int, list[int]]], n_blocks: int) -> tf.Tensor:
    """[n_blocks, HIST_BINS + 1] float32: per block, counts of |g| per binary exponent and of exact zeros.

    Args:
        grads: global-batch gradients (float32), in the order of the spec's params.
        groups: :meth:`ProbeSpec.hist_groups`.
        n_blocks: rows of the result (blocks without kernels stay zero).

    The bin of an entry is its float32 exponent field (bits 23-30 of |g|): a shift and a bincount, no log.
    """
    bias = 127  # IEEE 754 single-precision exponent bias
    rows = []
    for _, idx in groups:
        g = tf.abs(tf.concat([tf.reshape(tf.cast(grads[i], tf.float32), [-1]) for i in idx], axis=0))
        bits = tf.bitcast(g, tf.int32)
        zero = tf.reduce_sum(tf.cast(tf.equal(bits, 0), tf.float32))
        e = tf.clip_by_value(tf.bitwise.right_shift(bits, 23) - (bias + HIST_EXP_LO), 0, HIST_BINS - 1)
        # The raw op with a constant size: tf.math.bincount derives the size from the data, which XLA
        # (jit_compile, TPU) refuses.
        h = tf.raw_ops.DenseBincount(input=e, size=tf.constant(HIST_BINS, tf.int32), weights=tf.zeros([0], tf.float32),
                                     binary_output=False)
        h = tf.tensor_scatter_nd_sub(h, [[0]], [zero])  # zeros were counted in the first bin
        rows.append(tf.concat([h, zero[None]], axis=0))
    if not rows:
        return tf.zeros([n_blocks, HIST_BINS + 1])
    return tf.scatter_nd(tf.constant([[r] for r, _ in groups], tf.int32), tf.stack(rows), [n_blocks, HIST_BINS + 1])


def off_blocks(spec: ProbeSpec) -> tf.Tensor | None:
    """[n_blocks] bool: blocks whose branch gets no gradient by design right now (a stochastic-depth branch
    off for the whole batch, a ReZero weight at exactly 0), read before the update; None without such blocks."""
    pairs = [(row, v) for name in ("active", "alpha") for row, v in spec.scalars.get(name, [])]
    if not pairs:
        return None
    values = tf.equal(tf.stack([tf.cast(tf.convert_to_tensor(v), tf.float32) for _, v in pairs]), 0.0)
    return tf.scatter_nd(tf.constant([[row] for row, _ in pairs], tf.int32), values, [len(spec.blocks)])


def param_skip(spec: ProbeSpec, off: tf.Tensor | None) -> tf.Tensor | None:
    """[n_params] bool: the parameters of the blocks ``off`` marks (stem, head and other params: False)."""
    if off is None:
        return None
    rows = spec.param_block_rows()
    flags = tf.gather(tf.concat([off, [False]], axis=0), np.where(rows >= 0, rows, len(spec.blocks)))
    return flags
