"""Curvature of the training loss: top Hessian eigenvalue (power iteration), Hutchinson trace, stability bounds.

Pearlmutter 1994, "Fast exact multiplication by the Hessian"; Cohen et al. 2021, "Gradient descent on neural
networks typically occurs at the edge of stability"; Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability"; Hutchinson 1990, "A stochastic estimator of the trace of the influence matrix".

Everything works on a Hessian-vector product :func:`hvp_fn` built from a loss closure on a fixed batch (the
step's batch, or a fixed probe batch: the caller's choice). Vectors are lists of tensors shaped like the
variables. In a replica context (``strategy.run``) every product is all-reduced (SUM) before use, so with
the replicas' losses divided by the replica count (Keras' convention) the result is that of the global batch
and identical on every replica. Random vectors are stateless functions of a seed, hence equal on all replicas.

The loss closure must be deterministic and free of side effects: no dropout (each product would see another
mask) and BatchNorm in inference mode (``training=True`` would also move its running statistics once per
product). Which batch: the step's batch needs no extra data but makes the figure as noisy as the batch; a
fixed probe batch (Cohen et al. 2021 measure sharpness on a fixed subset) gives a curve over training.

Both product modes work eagerly, in a ``tf.function`` and under MirroredStrategy, with identical results
(tests). Measured on the benchmark MLP (plain_mlp 20x256, 1.27M weights, batch 64, 2-core CPU, quiet
machine): one product 21-24 ms in either mode against an 11-13 ms SGD step (1.6-2.1 steps of CPU time);
``top_eigenvalue`` with 20 iterations 0.43-0.53 s (33-47 steps), ``hutchinson_trace`` with 10 probes
0.29-0.34 s (23-30 steps); forward-over-reverse and reverse-over-reverse are within the noise of each other.
A warm start (``init``: the previous call's vector) cuts the iterations a call needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence

import numpy as np
from pydantic import Field

from ablations import compat
from ablations.instruments.base import Column, EveryOptions, Finish, Instrument, Reducer, StepContext
from ablations.instruments.kernels import all_reduce_sum, num_replicas
from ablations.lazy import pd, tf

Vector = list  # list of tensors shaped like the variables
FORWARD_OVER_REVERSE, REVERSE_OVER_REVERSE = "forward_over_reverse", "reverse_over_reverse"


# ------------------------------------------------------------------------------------------- products


def _raw(variables: Sequence[Any]) -> list[Any]:
    """The tf.Variables behind Keras 3 variables (ForwardAccumulator only watches TensorFlow's own)."""
    return [getattr(v, "value", v) if not isinstance(v, tf.Variable) else v for v in variables]


def hvp_fn(loss_fn: Callable[[], tf.Tensor], variables: Sequence[Any], mode: str = FORWARD_OVER_REVERSE,
           reduce: bool = True) -> Callable[[Vector], Vector]:
    """Returns ``v -> H v`` for the Hessian of ``loss_fn()`` w.r.t. ``variables``.

    Pearlmutter 1994, "Fast exact multiplication by the Hessian".

    Args:
        loss_fn: recomputes this replica's loss on the fixed batch (deterministic, see the module note).
        variables: the (Keras or TensorFlow) variables.
        mode: ``forward_over_reverse`` (a ForwardAccumulator around the gradient tape: the JVP of the
            gradient) or ``reverse_over_reverse`` (the gradient of g.v).
        reduce: all-reduce (SUM) the product over replicas (identity outside a replica context).
    """
    raw = _raw(variables)

    def forward_over_reverse(v: Vector) -> Vector:
        with tf.autodiff.ForwardAccumulator(raw, [tf.cast(t, w.dtype) for t, w in zip(v, raw)]) as acc:
            with tf.GradientTape() as tape:
                loss = loss_fn()
            grads = tape.gradient(loss, raw, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [acc.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO) for g in grads]

    def reverse_over_reverse(v: Vector) -> Vector:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn()
            grads = inner.gradient(loss, raw, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gv = tf.add_n([tf.reduce_sum(g * tf.cast(t, g.dtype)) for g, t in zip(grads, v)])
        return outer.gradient(gv, raw, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    product = {FORWARD_OVER_REVERSE: forward_over_reverse, REVERSE_OVER_REVERSE: reverse_over_reverse}.get(mode)
    if product is None:
        raise ValueError(f"mode must be {FORWARD_OVER_REVERSE} or {REVERSE_OVER_REVERSE}, got {mode!r}")
    return (lambda v: all_reduce_sum(product(v))) if reduce else product


def preconditioned(hvp: Callable[[Vector], Vector], inv_sqrt_p: Vector) -> Callable[[Vector], Vector]:
    """``v -> D H D v`` with ``D = P^{-1/2}`` (diagonal): its eigenvalues are those of ``P^{-1} H``.

    Cohen et al. 2022, "Adaptive gradient methods at the edge of stability" (preconditioned sharpness).
    """
    return lambda v: [d * hv for d, hv in zip(inv_sqrt_p, hvp([d * t for d, t in zip(inv_sqrt_p, v)]))]


def cross_replica_hvp_fn(strategy: Any, loss_fn: Callable[..., tf.Tensor], variables: Sequence[Any], args: tuple,
                         mode: str = FORWARD_OVER_REVERSE) -> Callable[[Vector], Vector]:
    """``v -> H v`` of the global batch from a cross-replica context (e.g. a callback's ``tf.function``).

    Each product is ``strategy.run`` of the replica's product on its part of the batch (``args``: distributed
    values, e.g. a batch of ``experimental_distribute_dataset``), summed with ``strategy.reduce``. Unlike
    :func:`hvp_fn` inside ``strategy.run``, this one may sit in a ``tf.while_loop`` (no ``merge_call`` in the
    loop body), so the iteration count does not grow the graph. ``loss_fn(*args)`` is the replica's loss,
    divided by the replica count as Keras does.
    """

    def hvp(v: Vector) -> Vector:
        def replica(*a: Any) -> Vector:
            vec, data = list(a[: len(variables)]), a[len(variables):]
            return hvp_fn(lambda: loss_fn(*data), variables, mode, reduce=False)(vec)

        per = strategy.run(replica, (*v, *args))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None) for t in per]

    return hvp


def _unroll(unroll: bool | None) -> bool:
    """Inside ``strategy.run`` with several replicas a while_loop cannot hold the products' all-reduce
    (MirroredStrategy's ``merge_call`` is refused in control flow): the loop is unrolled there."""
    return num_replicas() > 1 if unroll is None else unroll


def _loop(n: int, body: Callable[..., tuple], init: tuple, unroll: bool) -> tuple:
    """``n`` applications of ``body(i, *state) -> (i + 1, *state)``: a tf.while_loop, or unrolled in Python."""
    if unroll:
        state = init
        for _ in range(n):
            state = body(*state)
        return state
    return tf.while_loop(lambda i, *_: i < n, body, init, maximum_iterations=n)


def _dot(a: Vector, b: Vector) -> tf.Tensor:
    """float64 sum over tensors of per-tensor dot products taken in the tensors' dtype (no float64 copies of
    float32 vectors: on the benchmark MLP those casts cost a third of a Hutchinson probe)."""
    return tf.add_n([tf.cast(tf.reduce_sum(x * tf.cast(y, x.dtype)), tf.float64) for x, y in zip(a, b)])


def _random(shapes: Sequence[Any], dtypes: Sequence[Any], seed: Any, kind: str) -> Vector:
    """Stateless random vector (same on every replica): ``normal`` or ``rademacher`` entries."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    seed = tf.reshape(seed, [-1])[:2] if seed.shape.rank else tf.stack([seed, tf.constant(0, tf.int64)])
    out = []
    for k, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        s = seed + tf.constant([0, 1_000_003], tf.int64) * (k + 1)  # one stream per tensor
        if kind == "normal":
            out.append(tf.random.stateless_normal(shape, s, dtype=dtype))
        else:
            bits = tf.random.stateless_uniform(shape, s, minval=0, maxval=2, dtype=tf.int32)
            out.append(tf.cast(2 * bits - 1, dtype))
    return out


# ----------------------------------------------------------------------------------- power iteration


class Eigen(NamedTuple):
    """Result of :func:`top_eigenvalue` (float32 scalars; ``vector`` for warm starts; a tuple, so a
    ``tf.function`` can return it).

    Attributes:
        eigenvalue: the signed Rayleigh quotient v.Hv of the last unit iterate: the eigenvalue of largest
            magnitude (power iteration converges to max |lambda|), so it is negative when the most negative
            eigenvalue dominates. It is not the largest algebraic eigenvalue in that case.
        residual: ||H v - lambda v|| / |lambda| of that iterate (0 at an exact eigenvector). For symmetric H
            some eigenvalue lies within residual |lambda| of lambda, and the one v is closest to within
            residual^2 |lambda|^2 / gap (gap: to the rest of the spectrum).
        rel_change: |lambda_k - lambda_{k-1}| / |lambda_k| over the last iteration.
        vector: the last unit iterate (list of tensors).
    """

    eigenvalue: tf.Tensor
    residual: tf.Tensor
    rel_change: tf.Tensor
    vector: Vector


def top_eigenvalue(hvp: Callable[[Vector], Vector], variables: Sequence[Any], iterations: int = 20,
                   seed: Any = 0, init: Vector | None = None, unroll: bool | None = None) -> Eigen:
    """Eigenvalue of largest magnitude of the Hessian by power iteration, ``iterations`` products in a while_loop.

    Cohen et al. 2021 (sharpness = the top Hessian eigenvalue); Golub & Van Loan, "Matrix computations", 7.3.

    Args:
        hvp: :func:`hvp_fn` (or :func:`preconditioned`) product, reduced over replicas.
        variables: gives the shapes and dtypes of the vectors.
        iterations: products (fixed, static): the last one gives the returned Rayleigh quotient and residual.
        seed: int or int tensor (e.g. the step) for the random start; ignored with ``init``.
        init: a start vector (e.g. the previous call's ``vector``: a warm start needs far fewer iterations).
        unroll: Python-unrolled instead of a tf.while_loop (None: only inside ``strategy.run`` with several
            replicas, where the loop cannot hold the all-reduce; the graph then holds ``iterations`` copies
            of the product).

    Returns:
        :class:`Eigen`. Near the edge of stability the top of the spectrum is positive and isolated, so the
        magnitude and the algebraic maximum coincide; ``residual`` says whether ``iterations`` sufficed.
    """
    shapes, dtypes = [v.shape for v in variables], [v.dtype for v in variables]
    v0 = init if init is not None else _random(shapes, dtypes, seed, "normal")
    v0 = _normalised(v0)
    nan = tf.constant(float("nan"), tf.float64)

    def body(i, v, lam, _prev, _res):
        w = hvp(v)
        new = _dot(v, w)  # Rayleigh quotient (v is a unit vector)
        r = [a - tf.cast(new, a.dtype) * b for a, b in zip(w, v)]
        res = tf.sqrt(_dot(r, r)) / tf.abs(new)
        return i + 1, _normalised(w), new, lam, res

    _, v, lam, prev, res = _loop(iterations, body, (tf.constant(0), v0, nan, nan, nan), _unroll(unroll))
    # The returned vector is H v normalised: the next iterate, a better warm start than v itself.
    rel = tf.abs(lam - prev) / tf.abs(lam)
    return Eigen(tf.cast(lam, tf.float32), tf.cast(res, tf.float32), tf.cast(rel, tf.float32), v)


def _normalised(v: Vector) -> Vector:
    n = tf.sqrt(_dot(v, v))
    n = tf.where(n > 0, n, tf.ones_like(n))  # a zero product (zero Hessian) stays zero, not NaN
    return [t / tf.cast(n, t.dtype) for t in v]


# ------------------------------------------------------------------------------------------ Hutchinson


def hutchinson_trace(hvp: Callable[[Vector], Vector], variables: Sequence[Any], probes: int = 10,
                     seed: Any = 0, unroll: bool | None = None) -> dict[str, tf.Tensor]:
    """Unbiased estimate of tr(H) from ``probes`` Rademacher probes z: the mean of z.Hz.

    Hutchinson 1990, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines" (Rademacher probes minimise the variance: Var z.Hz = 2 (||H||_F^2 - sum_i H_ii^2)).

    Returns ``{"trace", "stderr"}`` (float32; stderr = sample std / sqrt(probes), NaN for one probe).
    ``unroll``: as :func:`top_eigenvalue`.
    """
    shapes, dtypes = [v.shape for v in variables], [v.dtype for v in variables]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)

    def body(k, s, ss):
        z = _random(shapes, dtypes, tf.stack([tf.reshape(seed, [-1])[0], tf.cast(k, tf.int64) + 1]), "rademacher")
        q = _dot(z, hvp(z))
        return k + 1, s + q, ss + q * q

    zero = tf.constant(0.0, tf.float64)
    _, s, ss = _loop(probes, body, (tf.constant(0), zero, zero), _unroll(unroll))
    n = tf.constant(float(probes), tf.float64)
    mean = s / n
    var = (ss - n * mean * mean) / (n - 1.0) if probes > 1 else tf.constant(float("nan"), tf.float64)
    return {"trace": tf.cast(mean, tf.float32), "stderr": tf.cast(tf.sqrt(tf.maximum(var, 0.0) / n), tf.float32)}


def _flat(v: Vector) -> tf.Tensor:
    return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in v], 0)


def _unflat(x: tf.Tensor, variables: Sequence[Any]) -> Vector:
    sizes = [int(v.shape.num_elements()) for v in variables]
    return [tf.cast(tf.reshape(p, v.shape), v.dtype) for p, v in zip(tf.split(x, sizes), variables)]


def _products(hvp: Callable[[Vector], Vector], variables: Sequence[Any], columns: tf.Tensor,
              unroll: bool) -> tf.Tensor:
    """``H X`` for ``X [n, k]`` (flat float64 columns), one product per column."""
    k = columns.shape[1]
    if unroll:
        return tf.stack([_flat(hvp(_unflat(columns[:, j], variables))) for j in range(k)], axis=1)

    def body(j, acc):
        return j + 1, acc.write(j, _flat(hvp(_unflat(columns[:, j], variables))))

    _, acc = _loop(k, body, (tf.constant(0), tf.TensorArray(tf.float64, size=k)), False)
    return tf.transpose(acc.stack())


def hutchpp_trace(hvp: Callable[[Vector], Vector], variables: Sequence[Any], sketch: int = 10,
                  probes: int = 10, seed: Any = 0, unroll: bool | None = None) -> dict[str, tf.Tensor]:
    """tr(H) by Hutch++: the trace on a ``sketch``-dimensional range of H exactly, Hutchinson on the rest.

    Meyer, Musco, Musco & Woodruff 2021, "Hutch++: optimal stochastic trace estimation".

    ``Q = orth(H S)`` for ``sketch`` Rademacher columns S; ``tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))``,
    the second term by ``probes`` Rademacher probes. Unbiased; the variance falls with the spectrum's tail,
    which for network Hessians (a few outliers above a bulk, Sagun et al. 2017) is most of the gain; exact
    when ``sketch`` reaches the rank. Costs ``2 sketch + probes`` products and holds ``2 sketch`` flat
    vectors of the parameter count (float64). Returns ``{"trace", "stderr"}`` (stderr of the residual part).
    ``unroll``: as :func:`top_eigenvalue`.
    """
    n = sum(int(v.shape.num_elements()) for v in variables)
    unroll = _unroll(unroll)
    seed = tf.reshape(tf.cast(tf.convert_to_tensor(seed), tf.int64), [-1])[0]
    rad = lambda k, s: tf.cast(2 * tf.random.stateless_uniform([n, k], tf.stack([seed, s]), 0, 2, tf.int32) - 1,
                               tf.float64)  # noqa: E731
    q, _ = tf.linalg.qr(_products(hvp, variables, rad(sketch, tf.constant(7, tf.int64)), unroll))
    low = tf.linalg.trace(tf.transpose(q) @ _products(hvp, variables, q, unroll))
    g = rad(probes, tf.constant(11, tf.int64))
    g = g - q @ (tf.transpose(q) @ g)  # probes of the complement
    hg = _products(hvp, variables, g, unroll)
    hg = hg - q @ (tf.transpose(q) @ hg)
    per = tf.reduce_sum(g * hg, 0)  # [probes]: z^T (I - QQ^T) H (I - QQ^T) z
    k = tf.constant(float(probes), tf.float64)
    mean = tf.reduce_mean(per)
    var = tf.reduce_sum(tf.square(per - mean)) / (k - 1.0) if probes > 1 else tf.constant(float("nan"), tf.float64)
    return {"trace": tf.cast(low + mean, tf.float32), "stderr": tf.cast(tf.sqrt(var / k), tf.float32)}


# ------------------------------------------------------------------------------------- stability bound


@dataclasses.dataclass(frozen=True)
class StabilityBound:
    """The sharpness above which the optimizer is unstable on the local quadratic.

    Attributes:
        value: the bound (a float or a float32 tensor when the learning rate is one), None where none applies.
        quantity: ``sharpness`` (lambda_max(H)) or ``preconditioned_sharpness`` (lambda_max(P^{-1} H), see
            :func:`adam_preconditioner`), None without a bound.
        reason: the formula and its source, or why there is no bound.
    """

    value: Any
    quantity: str | None
    reason: str


def stability_bound(kind: str, lr: Any, momentum: float = 0.0, nesterov: bool = False,
                    beta_1: float = 0.9) -> StabilityBound:
    """Stability bound of ``kind`` (``sgd``, ``adam``, ``adamw``, ``rmsprop``) at learning rate ``lr``.

    Cohen et al. 2021 (section 2 and appendix): on a quadratic with curvature lambda, gradient descent
    diverges iff lambda > 2/lr; heavy-ball momentum beta iff lambda > (2 + 2 beta)/lr; Nesterov momentum iff
    lambda > (2 + 2 beta)/((1 + 2 beta) lr) (the iteration x_{k+1} = (1 - lr lambda)((1 + beta) x_k - beta
    x_{k-1}) has a root -1 there). Cohen et al. 2022: Adam with beta_1 is unstable when its preconditioned
    sharpness exceeds (2 + 2 beta_1)/((1 - beta_1) lr) (38/lr at 0.9); RMSprop without momentum at 2/lr.
    """
    kind = kind.lower()
    if kind == "sgd":
        b = float(momentum)
        if b == 0.0:
            return StabilityBound(2.0 / lr, "sharpness", "gradient descent: 2/lr (Cohen et al. 2021)")
        if nesterov:
            return StabilityBound((2.0 + 2.0 * b) / ((1.0 + 2.0 * b) * lr), "sharpness",
                                  "Nesterov momentum: (2 + 2 beta)/((1 + 2 beta) lr) (Cohen et al. 2021, appendix)")
        return StabilityBound((2.0 + 2.0 * b) / lr, "sharpness",
                              "heavy-ball momentum: (2 + 2 beta)/lr (Cohen et al. 2021)")
    if kind in ("adam", "adamw"):
        b1 = float(beta_1)
        note = "; AdamW's decoupled decay shifts it by O(lr wd), ignored" if kind == "adamw" else ""
        return StabilityBound((2.0 + 2.0 * b1) / ((1.0 - b1) * lr), "preconditioned_sharpness",
                              "Adam: (2 + 2 beta_1)/((1 - beta_1) lr) on lambda_max(P^-1 H), P = the current "
                              f"preconditioner (Cohen et al. 2022); not a bound on the raw sharpness{note}")
    if kind == "rmsprop" and float(momentum) == 0.0:
        return StabilityBound(2.0 / lr, "preconditioned_sharpness",
                              "RMSprop: 2/lr on lambda_max(P^-1 H), P = sqrt(v) + eps (Cohen et al. 2022)")
    return StabilityBound(None, None, f"no stability bound for {kind} (momentum {momentum}): the local-quadratic "
                                      "analysis of Cohen et al. 2021/2022 covers GD, heavy-ball, Nesterov, "
                                      "RMSprop without momentum and Adam only")


def edge_of_stability(optimizer: Any) -> StabilityBound:
    """:func:`stability_bound` for a Keras optimizer at its current learning rate (schedules: this step's)."""
    kind = type(optimizer).__name__.lower()
    inner = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer: the wrapped one decides
    if inner is not None:
        return edge_of_stability(inner)
    lr = optimizer.learning_rate
    lr = float(lr) if isinstance(lr, (int, float)) else tf.cast(lr, tf.float32)  # a variable or a schedule's value
    if kind in ("sgd", "rmsprop"):
        if kind == "rmsprop" and getattr(optimizer, "centered", False):
            return StabilityBound(None, None, "no stability bound for centered RMSprop")
        return stability_bound(kind, lr, float(getattr(optimizer, "momentum", 0.0) or 0.0),
                               bool(getattr(optimizer, "nesterov", False)))
    if kind in ("adam", "adamw"):
        if getattr(optimizer, "amsgrad", False):
            return StabilityBound(None, None, "no stability bound for AMSGrad (its preconditioner is a running max)")
        return stability_bound(kind, lr, beta_1=float(optimizer.beta_1))
    return stability_bound(kind, lr)


def adam_preconditioner(optimizer: Any, variables: Sequence[Any]) -> Vector:
    """``P^{-1/2}`` per variable for a Keras Adam/AdamW, as its next step will apply it (for :func:`preconditioned`).

    Cohen et al. 2022. Keras' update is ``w -= lr m / ((1 - b1^t)(sqrt(v / (1 - b2^t)) + eps / sqrt(1 -
    b2^t)))`` with ``t = iterations + 1``, so ``P = (1 - b1^t)(sqrt(v_hat) + eps_hat)``. The second moments
    ``v`` are the optimizer's before this step's update (the step's gradient not yet folded in).
    """
    t = tf.cast(optimizer.iterations + 1, tf.float32)
    b1, b2 = tf.cast(optimizer.beta_1, tf.float32), tf.cast(optimizer.beta_2, tf.float32)
    c2 = tf.sqrt(1.0 - tf.pow(b2, t))
    out = []
    for var in variables:
        v = tf.cast(compat.optimizer_slot(optimizer, var, "velocities"), tf.float32)
        p = (1.0 - tf.pow(b1, t)) * (tf.sqrt(v) / c2 + optimizer.epsilon / c2)
        out.append(tf.cast(tf.math.rsqrt(p), var.dtype))
    return out


# ------------------------------------------------------------------------------------------ the instrument

TRACE_SEED = 7919  # the Hutchinson probes of step s are seeded (s + TRACE_SEED, k + 1), the power iteration's (s, 0)
CURVATURE_VALUES = ("sharpness", "sharpness_rel_change", "sharpness_residual", "hessian_trace",
                    "hessian_trace_stderr", "lr", "stability_bound", "preconditioned_sharpness")


class CurvatureOptions(EveryOptions):
    """``capture.instruments.curvature``: cadence, power iterations, Hutchinson probes, product mode."""

    # A power of two, so that it is a multiple of every power-of-two capture.every (as it must be).
    every: Optional[int] = Field(64, gt=0)
    iterations: int = Field(20, ge=2, le=1000)  # Hessian-vector products of the power iteration
    probes: int = Field(10, ge=0, le=1000)  # Rademacher probes of the Hutchinson trace (0: no trace)
    mode: Literal["forward_over_reverse", "reverse_over_reverse"] = FORWARD_OVER_REVERSE
    # Adam/AdamW: also lambda_max(P^-1 H) (another `iterations` products), the quantity its bound is on.
    preconditioned: bool = True


def _inner(optimizer: Any) -> Any:
    """The optimizer that decides the update (a LossScaleOptimizer's wrapped one)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    return optimizer if inner is None else _inner(inner)


class Curvature(Instrument):
    """Sharpness (top Hessian eigenvalue of the training loss), Hutchinson trace and the stability bound.

    Every ``every`` steps, on the step's batch, at the weights the step's gradient was taken at (before the
    update, inside the compiled step: no host round trip): ``iterations`` power iterations on Hessian-vector
    products give the signed eigenvalue of largest magnitude (the top eigenvalue whenever the top of the
    spectrum is positive and dominant, as it is near the edge of stability) with its convergence figures, and
    ``probes`` Rademacher probes the trace. The loss is recomputed with the layers in inference mode (no
    dropout, BatchNorm on its moving statistics: a deterministic, side-effect-free closure); for models
    without dropout or BatchNorm it is exactly the training loss. The bound is the optimizer's at the rate of
    this step (:func:`edge_of_stability`); for Adam/AdamW it bounds the preconditioned sharpness, computed
    here too (Cohen et al. 2022; NaN at step 0, where Adam's second moments are still zero).
    """

    name = "curvature"
    table = "curvature"
    order = 70
    default = False
    Opts = CurvatureOptions
    needs = frozenset({"before_update"})
    summary_keys = ("sharpness_final", "edge_ratio_max")
    columns = (
        Column("sharpness", "signed Hessian eigenvalue of largest magnitude (power iteration on the step's batch)",
               "curvature/sharpness"),
        Column("sharpness_rel_change", "|lambda_k - lambda_k-1| / |lambda_k| over the last power iteration"),
        Column("sharpness_residual", "||H v - lambda v|| / |lambda| of the last iterate (0: an exact eigenvector)"),
        Column("hessian_trace", "Hutchinson estimate of tr(H) (NaN with probes: 0)", "curvature/hessian_trace"),
        Column("hessian_trace_stderr", "its standard error (sample std of z.Hz / sqrt(probes))"),
        Column("lr", "learning rate applied at this step"),
        Column("stability_bound", "the optimizer's bound at this rate: 2/lr (SGD), (2 + 2 momentum)/lr "
               "(heavy ball), 38/lr on the preconditioned sharpness (Adam, beta_1 0.9); NaN without one",
               "curvature/stability_bound"),
        Column("preconditioned_sharpness", "lambda_max(P^-1 H) for Adam/AdamW (Cohen et al. 2022), else NaN",
               "curvature/preconditioned_sharpness"),
        Column("edge_ratio", "the bounded quantity (sharpness, or the preconditioned one for Adam) / the bound"),
    )

    def shape(self) -> tuple[int, ...]:
        return (len(CURVATURE_VALUES),)

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        if tf.executing_eagerly():  # measure(): an eager while_loop runs its Python body per iteration
            values = tf.function(lambda: self.values(ctx))()
        else:
            values = self.values(ctx)
        return lambda r: values

    # Explicit while_loops: autograph has nothing to convert here, but converting the net and Keras code it
    # calls took seconds per trace (measure()'s tf.function and the train step's).
    @tf.autograph.experimental.do_not_convert
    def values(self, ctx: StepContext) -> Any:
        """[len(CURVATURE_VALUES)] float32 of this step (in graph)."""
        o = self.options
        net, model, variables = self.spec.net, ctx.model, list(ctx.variables)

        def loss_fn() -> Any:
            pred = net(ctx.x, training=False)
            return tf.cast(compat.compute_loss(model, ctx.x, ctx.y, pred, ctx.sample_weight), tf.float32)

        hvp = hvp_fn(loss_fn, variables, o.mode)
        eig = top_eigenvalue(hvp, variables, o.iterations, seed=ctx.step)
        nan = tf.constant(float("nan"), tf.float32)
        trace = hutchinson_trace(hvp, variables, o.probes, seed=ctx.step + TRACE_SEED) if o.probes else \
            {"trace": nan, "stderr": nan}
        opt = model.optimizer
        bound = edge_of_stability(opt)
        value = nan if bound.value is None else tf.cast(bound.value, tf.float32)
        pre = nan
        if bound.quantity == "preconditioned_sharpness":
            inner = _inner(opt)
            if o.preconditioned and type(inner).__name__.lower() in ("adam", "adamw"):
                if not inner.built:  # the first traced step reaches here before apply_gradients builds it
                    inner.build(variables)
                p = top_eigenvalue(preconditioned(hvp, adam_preconditioner(inner, variables)), variables,
                                   o.iterations, seed=ctx.step + 1)
                pre = tf.where(inner.iterations > 0, p.eigenvalue, nan)  # step 0: no second moments yet
            else:  # RMSprop (no preconditioner here), or switched off: no bound to compare with
                value = nan
        lr = tf.cast(opt.learning_rate, tf.float32)
        return tf.stack([eig.eigenvalue, eig.rel_change, eig.residual, trace["trace"], trace["stderr"], lr,
                         value, pre])

    def frame(self, steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame({"step": steps, "epoch": epochs})
        for k, name in enumerate(CURVATURE_VALUES):
            df[name] = values[:, k].astype(np.float32)
        bounded = np.where(np.isfinite(df["preconditioned_sharpness"]), df["preconditioned_sharpness"],
                           df["sharpness"])
        with np.errstate(divide="ignore", invalid="ignore"):
            df["edge_ratio"] = (bounded / df["stability_bound"]).astype(np.float32)
        return df

    @classmethod
    def summarize(cls, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        c = tables.get("curvature")
        if c is None or c.empty or not np.isfinite(c["sharpness"]).any():
            return {}
        last = c[np.isfinite(c["sharpness"])].iloc[-1]
        return {"sharpness_final": float(last["sharpness"]), "edge_ratio_max": float(np.nanmax(c["edge_ratio"]))
                if np.isfinite(c["edge_ratio"]).any() else None}
