"""Reduction kernels shared by every instrument: norms that survive underflow, replica sums.

On CPU their cost is memory traffic and op count, so each norm of a large tensor is one L2Loss kernel and
small tensors of one shape are stacked and reduced in one op (README, Capture overhead, has the profile).
TensorFlow is imported lazily (see :mod:`ablations.instruments.base`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ablations import compat
from ablations.lazy import tf


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

    return unlowered_cond(tf.reduce_any(tiny), rescaled, lambda: tf.sqrt(sq))


def unlowered_cond(pred: tf.Tensor, true_fn: Any, false_fn: Any) -> tf.Tensor:
    """``tf.cond`` kept as one functional ``If`` op in a graph.

    Lowered (TensorFlow's default in graphs), every tensor the branches read gets a Switch node that runs on
    every step: for the ~140 tensors of the norms that cost 6-17% of a step of the benchmark MLP (measured);
    one ``If`` call costs about nothing. Eager code and XLA take the cond as it is.
    """
    if tf.executing_eagerly():
        return tf.cond(pred, true_fn, false_fn)
    graph = tf.compat.v1.get_default_graph()
    start = len(graph.get_operations())
    out = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[start:]:
        if op.type in ("If", "StatelessIf"):
            compat.keep_functional_if(op)
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
