"""Spectral norm (largest singular value) of every weight matrix, tracked by warm-started subspace iteration.

Miyato et al. 2018, "Spectral normalization for generative adversarial networks" (the warm-started power
iteration and the reading of a convolution kernel as a matrix; here with a block of vectors: subspace
iteration, Golub & Van Loan 2013, 8.2.4). A layer's spectral norm bounds how much it can
stretch a signal, forward and backward: the product over depth bounds the input-output Jacobian's norm, so a
run of layers above 1 is where a gradient can explode (the ``jacobian`` instrument measures the whole spectrum
of the composed map; this one says which layer contributes).

The instrument (``capture.instruments.spectral_norm: true``, or ``{every, tol, max_iterations, block}``;
opt-in) adds ``spectral_norm`` and ``spectral_norm_converged`` to ``params.parquet`` at the probe's cadence
(``capture.every``) or every ``every`` steps (a multiple of it; NaN on the other captures), read before the
step's update, like ``weight_norm``.

How: when the probe is built, the top ``block`` (4) right singular vectors of every matrix are found on the
host to float64 accuracy (LAPACK's SVD, ARPACK for large matrices), so the first capture is exact. Each captured
step then runs subspace iteration from the previous capture's vectors until the estimate changes by less than
``tol`` over one iteration (at most ``max_iterations``) and stores the new vectors (tracked by the probed model:
checkpoints keep them). ``spectral_norm_converged`` is 1 where the stopping rule was met, 0 where the cap was
hit. The estimate, the top singular value of W seen through the block's subspace, never exceeds the true
value. The products run in float32 (float64 matrix products cost 3-4x on CPU; float32's round-off of the
estimate, ~1e-6, is far below ``tol``).

Measured against NumPy's SVD of the weights of every step, 30-block width-64 MLPs on digits, SGD 0.02 with momentum, 176 steps, every step
captured: Glorot/tanh and He/ReLU max error 2.4e-5 (median 1e-7 to 4e-7); orthogonal/tanh max 3.0e-3 (median
3e-6), in the first steps, where all 64 singular values lie within 0.4% of each other: no iterative method
separates such a cluster in a few products, and its error is bounded by the cluster's width. With a single
vector (``block: 1``, plain power iteration) the orthogonal case was 0.8% off at convergence to 1e-5 per
iteration, and a fixed two iterations per capture 1.2% off in the tracking test.

Which tensors: kernels (``kernel``, ``recurrent_kernel``, ``pointwise_kernel``, ``embeddings``) of rank >= 2.
A kernel ``[..., out]`` is the matrix ``[prod(...), out]`` (a convolution's ``[kh, kw, in, out]`` becomes
``[kh*kw*in, out]``: Miyato's convention, which is within a factor sqrt(kh*kw) of the convolution operator's own
norm, Sedghi et al. 2019); multi-head attention's query/key/value kernels ``[d, heads, head_dim]`` are the map
``[d, heads*head_dim]``. Biases, normalization scales and depthwise-convolution kernels (one filter per
channel, not one matrix) get NaN. Cost per captured step: per matrix and iteration two products with a ``[cols, block]``
block and two thin QR factorisations, far below the step's products with the batch (measured: README,
Capture overhead).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from pydantic import Field

from ablations import compat
from ablations.instruments.base import Column, EveryOptions, Finish, Instrument, Reducer, StepContext, keras, tf

MATRIX_PARAMS = ("kernel", "recurrent_kernel", "pointwise_kernel", "embeddings")
INPUT_FIRST = ("query/kernel", "key/kernel", "value/kernel")  # EinsumDense [d, heads, head_dim]: d -> heads*head_dim
EXACT_SVD_MAX = 512  # shorter side up to which the host seed is a full SVD (above: ARPACK's top triplet only)


class SpectralOptions(EveryOptions):
    # Iterations per captured step (at least one) run until the estimate changes by less than `tol`
    # (relative) over one iteration. The error left grows with how close the top singular values are: with
    # 1e-5, at most 2e-5 on Glorot/He kernels and 3e-3 on a cluster within 0.4% (module notes).
    tol: float = Field(1e-5, gt=0, lt=1)
    # A cap on the iterations of one capture (near-equal top singular values converge slowly); a capture
    # that hits it reads 0 in `spectral_norm_converged`.
    max_iterations: int = Field(100, ge=1, le=10_000)
    # Vectors iterated together (subspace iteration; 1 is plain power iteration). With one vector a kernel whose
    # top singular values are nearly equal (orthogonal init, after training) converged to < 1e-5 per iteration
    # while still 0.8% below the truth; a block of 4 sees past such a cluster.
    block: int = Field(4, ge=1, le=64)


def matrix_shape(param: str, shape: tuple[int, ...], depthwise: bool = False) -> Optional[tuple[int, int]]:
    """The matrix a weight tensor is read as (``[rows, cols]``), or None for tensors that are not one."""
    if len(shape) < 2 or depthwise or 0 in shape or param.rsplit("/", 1)[-1] not in MATRIX_PARAMS:
        return None
    if len(shape) == 3 and param.endswith(INPUT_FIRST):
        return int(shape[0]), int(math.prod(shape[1:]))
    return int(math.prod(shape[:-1])), int(shape[-1])


def top_right_vectors(m: np.ndarray, b: int) -> np.ndarray:
    """``[cols, b]``: the top ``b`` right singular vectors of ``m`` (float64), orthonormal, deterministic."""
    if min(m.shape) <= EXACT_SVD_MAX or b >= min(m.shape) - 1:
        v = np.linalg.svd(m, full_matrices=False)[2][:b].T
    else:
        from scipy.sparse.linalg import svds

        v = svds(m, k=b, v0=np.ones(min(m.shape)) / math.sqrt(min(m.shape)))[2].T
    return np.linalg.qr(v)[0]


def subspace_iteration(m: Any, v: Any, tol: float, max_iterations: int) -> tuple[Any, Any, Any]:
    """Subspace iteration on stacked matrices ``m`` [k, rows, cols] from orthonormal blocks ``v`` [k, cols, b],
    until every estimate changed by less than ``tol`` (relative) over an iteration, at most ``max_iterations``
    (at least one).

    The estimate is the Rayleigh-Ritz value of the block: the square root of the largest eigenvalue of
    ``(m v)^T (m v)`` (b x b), i.e. the top singular value of ``m`` restricted to the block's subspace: it never
    exceeds the true value, and it converges like (sigma_{b+1} / sigma_1)^2 per iteration, so a block sees past
    near-equal top singular values where a single vector (b = 1, plain power iteration) crawls. One iteration:
    ``v = qr(m^T (m v))``.

    Returns ``(sigma, converged, v)``: the estimates [k], 1.0 where the last change was within ``tol`` (0.0
    where the cap stopped the iteration first) and the new blocks.
    """
    def ritz(y: Any) -> Any:
        return tf.sqrt(tf.maximum(tf.linalg.eigvalsh(tf.linalg.matmul(y, y, adjoint_a=True))[..., -1], 0.0))

    def body(i: Any, v: Any, y: Any, sigma: Any, rel: Any) -> tuple[Any, ...]:
        v = tf.linalg.qr(tf.linalg.matmul(m, y, adjoint_a=True)).q
        y = tf.linalg.matmul(m, v)
        new = ritz(y)
        rel = tf.where(new > 0, tf.abs(new - sigma) / tf.where(new > 0, new, 1.0), tf.zeros_like(new))
        return i + 1, v, y, new, rel

    def cond(i: Any, v: Any, y: Any, sigma: Any, rel: Any) -> Any:
        return tf.logical_and(i < max_iterations, tf.reduce_max(rel) > tol)

    y = tf.linalg.matmul(m, v)
    sigma = ritz(y)
    start = (tf.constant(0), v, y, sigma, tf.fill(tf.shape(sigma), tf.constant(np.inf, m.dtype)))
    _, v, _, sigma, rel = tf.while_loop(cond, body, start)
    return sigma, tf.cast(rel <= tol, m.dtype), v


class SpectralNorm(Instrument):
    """Per weight matrix: its largest singular value, by warm-started subspace iteration (Miyato et al. 2018)."""

    name = "spectral_norm"
    table = "params"
    order = 16
    default = False
    Opts = SpectralOptions
    columns = (
        Column("spectral_norm", "largest singular value of the tensor read as a matrix (kernels; NaN for biases, "
                                "norm scales, depthwise kernels), before the update (capture.instruments."
                                "spectral_norm)", "spectral_norm/{layer}/{param}"),
        Column("spectral_norm_converged", "1 where that estimate changed by less than `tol` over its last "
                                          "iteration, 0 where `max_iterations` stopped it first"),
    )

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        variables = self.spec.net.trainable_variables
        shapes = [matrix_shape(p, tuple(v.shape), _depthwise(self.spec.net, layer))
                  for p, layer, v in zip(self.spec.params["param"], self.spec.params["layer"], variables)]
        # Matrices of one shape are stacked and iterated together (one op per step for the group).
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(shapes):
            if s is not None:
                groups.setdefault(s, []).append(i)
        self.groups = list(groups.items())
        self._vectors: list[Any] | None = None

    def applies(self) -> bool:
        return bool(self.groups)

    def state(self) -> list[Any]:
        if self._vectors is None:
            variables = self.spec.net.trainable_variables
            self._vectors = [
                keras.Variable(np.stack([top_right_vectors(np.asarray(variables[i], np.float64).reshape(shape),
                                                           min(self.options.block, *shape))
                                         for i in rows]).astype(np.float32),
                               trainable=False, aggregation="only_first_replica", name=f"spectral_norm_v_{g}")
                for g, (shape, rows) in enumerate(self.groups)]
        return self._vectors

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        rows, sigmas, converged = [], [], []
        for (shape, idx), state in zip(self.groups, self.state()):
            m = tf.stack([tf.reshape(tf.cast(ctx.variables[i], tf.float32), shape) for i in idx])
            sigma, ok, v = subspace_iteration(m, tf.convert_to_tensor(state), self.options.tol,
                                              self.options.max_iterations)
            ctx.before_update.append(sigma)  # read before the update, without a copy of the weights
            state.assign(v)
            rows += idx
            sigmas.append(sigma)
            converged.append(ok)
        sigma, ok = tf.concat(sigmas, axis=0), tf.concat(converged, axis=0)
        return lambda r: {"spectral_norm": (rows, sigma), "spectral_norm_converged": (rows, ok)}


def _depthwise(net: Any, layer: str) -> bool:
    """Whether the params row's layer is a depthwise convolution (its kernel is a filter per channel)."""
    try:
        return isinstance(net.get_layer(layer), compat.linear_layer_bases()[2])
    except ValueError:  # a layer nested in another (keras-hub): not found by name, read by its param name
        return False
