"""Dynamical isometry: singular values of the input-output Jacobian and each block's mean squared singular value.

Saxe, McClelland & Ganguli 2014, "Exact solutions to the nonlinear dynamics of learning in deep linear
neural networks"; Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep learning through
dynamical isometry"; Halko, Martinsson & Tropp 2011, "Finding structure with randomness".

The Jacobian of example i is ``J_i = d f(x_i) / d x_i`` (``m`` outputs by ``n`` inputs, flattened) of a map
``f`` between two tensors of the model, applied example-wise (inference mode: BatchNorm in training mode
couples the examples). Spectra are those of ``J_i^T J_i`` (its ``n`` eigenvalues = the squared singular
values, padded with ``n - m`` zeros when ``m < n``): ``mean_sq = ||J||_F^2 / n`` (the mean squared singular
value, the per-example ``chi^L`` of Pennington et al.), ``var_sq`` their variance over the ``n``
eigenvalues (the sigma^2_{JJ^T} that grows linearly with depth for Gaussian ReLU nets at mean 1) and
``rel_var_sq = var_sq / mean_sq^2``, the same spread free of the overall gain (whose finite-width
fluctuations dominate ``var_sq`` of a deep net: measured, it is the steadier figure across seeds).

* ``exact`` (``m n <= EXACT_MAX_ENTRIES``): ``batch_jacobian`` then ``tf.linalg.svd`` (all singular values);
* ``randomized`` (larger): the top ``k`` singular values by randomized subspace iteration (Halko et al.
  2011, Alg. 4.4: ``(k + oversample)(2 power_iters + 2)`` JVPs/VJPs, never the full matrix) and ``mean_sq``,
  ``var_sq`` by Hutchinson (one JVP and one VJP per probe: ``||J z||^2`` and ``||J^T J z||^2``).

Measured (2-core CPU, 4 examples): the benchmark MLP (plain_mlp 20x256, J 256 x 64) 51 ms exact, 102 ms
randomized (k = 8), its 20 block gains with 4 probes 7 ms; at the switch point (8x512, J 512 x 512) 250 ms
exact against 313 ms randomized, so the exact SVD, which gives the whole spectrum, is kept up to there.

Sub-models: in Keras 3.15 ``keras.Model(intermediate, intermediate)`` works (:func:`path_model`; the start
tensor is cloned into an InputLayer and the path's layers are shared, weights included) and raises
``ValueError`` ("is not connected to inputs") when the end depends on anything but the start (a skip from
before it).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
from pydantic import Field

import zoo
from ablations.instruments.base import Column, Instrument, Options
from ablations.lazy import keras, pd, tf

# Largest m * n per example for the exact SVD: 512 x 512 (1 MiB per example in float32; batch_jacobian
# costs min(m, n) vectorised backward passes and the SVD ~ m n min(m, n) flops: milliseconds at this size).
EXACT_MAX_ENTRIES = 512 * 512
EXACT, RANDOMIZED = "exact", "randomized"


# --------------------------------------------------------------------------------------------- paths


def path_model(model: keras.Model, start: Any, end: Any) -> keras.Model:
    """The sub-model from the KerasTensor ``start`` to ``end`` of a functional ``model`` (layers shared)."""
    return keras.Model(start, end, name=f"{model.name}_path")


def _inputs(layer: Any) -> list[Any]:
    x = layer.input  # public: the tensors of the layer's single call (zoo layers are called once)
    return list(x) if isinstance(x, (list, tuple)) else [x]


def block_boundaries(model: keras.Model, blocks: Sequence[tuple[str, Sequence[Any]]] | None = None
                     ) -> list[tuple[str, Any, Any]]:
    """``[(block name, input tensor, output tensor)]`` of every block, in depth order.

    Args:
        model: a functional model.
        blocks: ``[(name, layers)]`` (e.g. the probe spec's block views); default the zoo's tagged blocks.

    A block's input is the one tensor its layers read from outside the block; its output the one tensor
    they produce that layers outside the block (or the model's outputs) read. Public API only
    (``layer.input``/``layer.output`` of single-call layers).
    """
    if blocks is None:
        blocks = [(b.prefix, list(b.layers.values())) for b in zoo.blocks(model)]
    producer = {id(l.output): l for l in model.layers if not isinstance(l, keras.layers.InputLayer)}
    readers: dict[int, list[Any]] = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            for t in _inputs(layer):
                readers.setdefault(id(t), []).append(layer)
    outputs = {id(t) for t in model.outputs}
    out = []
    for name, layers in blocks:
        members = {id(l) for l in layers}
        ins = {id(t): t for l in layers for t in _inputs(l) if id(producer.get(id(t))) not in members}
        outs = {id(l.output): l.output for l in layers
                if id(l.output) in outputs or any(id(r) not in members for r in readers.get(id(l.output), []))}
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"block {name}: {len(ins)} inputs and {len(outs)} outputs cross its boundary, "
                             "need 1 and 1")
        out.append((name, next(iter(ins.values())), next(iter(outs.values()))))
    return out


def io_path(model: keras.Model, blocks: Sequence[tuple[str, Sequence[Any]]] | None = None) -> keras.Model:
    """The sub-model from the first block's input to the last block's output (the head's input in the zoo)."""
    bounds = block_boundaries(model, blocks)
    return path_model(model, bounds[0][1], bounds[-1][2])


# ------------------------------------------------------------------------------------------ products


def _flat_fn(fn: Callable[[tf.Tensor], tf.Tensor], in_shape: Sequence[int]) -> Callable[[tf.Tensor], tf.Tensor]:
    """``[B, n] -> [B, m]`` version of an example-wise ``fn`` on ``[B, *in_shape]``."""
    def flat(x: tf.Tensor) -> tf.Tensor:
        y = fn(tf.reshape(x, [-1, *in_shape]))
        return tf.reshape(y, [tf.shape(y)[0], -1])

    return flat


def jvp(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
    """``J_i t_i`` per example (forward mode)."""
    with tf.autodiff.ForwardAccumulator(x, t) as acc:
        y = fn(x)
    return acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def vjp(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """``J_i^T u_i`` per example (one backward pass: the examples are independent)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, x, output_gradients=u, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _columns(op: Callable[[tf.Tensor], tf.Tensor], cols: tf.Tensor) -> tf.Tensor:
    """``[B, out, l]``: ``op`` applied to each of the ``l`` columns of ``cols [B, in, l]`` (a while_loop)."""
    l = cols.shape[-1]

    def body(j, acc):
        return j + 1, acc.write(j, op(cols[:, :, j]))

    _, acc = tf.while_loop(lambda j, _: j < l, body, (tf.constant(0), tf.TensorArray(cols.dtype, size=l)),
                           maximum_iterations=l)
    return tf.transpose(acc.stack(), [1, 2, 0])


# ------------------------------------------------------------------------------------------ spectrum


def choose_method(m: int, n: int) -> str:
    """``exact`` when the per-example Jacobian has at most :data:`EXACT_MAX_ENTRIES` entries, else ``randomized``."""
    return EXACT if m * n <= EXACT_MAX_ENTRIES else RANDOMIZED


def exact_spectrum(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor) -> dict[str, tf.Tensor]:
    """All singular values ``[B, min(m, n)]`` (descending) and ``mean_sq``, ``var_sq`` ``[B]`` from the full
    per-example Jacobian (``batch_jacobian`` + ``tf.linalg.svd``)."""
    n = int(np.prod(x.shape[1:]))
    f = _flat_fn(fn, x.shape[1:])
    xf = tf.reshape(x, [-1, n])
    with tf.GradientTape(persistent=True) as tape:  # persistent: batch_jacobian without pfor needs it eagerly
        tape.watch(xf)
        y = f(xf)
    # A while loop of m backward passes, not pfor's vectorised one: pfor's jacobian of Keras'
    # MultiHeadAttention corrupts the heap in TF 2.21 (segfault / "munmap_chunk(): invalid pointer", eager
    # and in tf.function; tests/test_jacobian.py::test_the_exact_path_survives_multi_head_attention).
    jac = tape.batch_jacobian(y, xf, experimental_use_pfor=False)  # [B, m, n]
    s = tf.linalg.svd(tf.cast(jac, tf.float64), compute_uv=False)
    s2 = tf.square(s)
    m1 = tf.reduce_sum(s2, -1) / n  # zeros of a wide Jacobian count in the mean over n
    m2 = tf.reduce_sum(tf.square(s2), -1) / n
    return {"singular_values": tf.cast(s, tf.float32), **_moments(m1, m2)}


def _moments(m1: tf.Tensor, m2: tf.Tensor) -> dict[str, tf.Tensor]:
    """mean, variance and scale-free variance (variance / mean^2) of the eigenvalues of J^T J."""
    var = m2 - tf.square(m1)
    return {"mean_sq": tf.cast(m1, tf.float32), "var_sq": tf.cast(var, tf.float32),
            "rel_var_sq": tf.cast(var / tf.square(m1), tf.float32)}


def randomized_top_singular_values(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, k: int = 8,
                                   oversample: int = 8, power_iters: int = 2, seed: Any = 0) -> tf.Tensor:
    """``[B, k]`` top singular values of each example's Jacobian by randomized subspace iteration.

    Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Alg. 4.4 and 5.1: ``Q = orth((J
    J^T)^q J Omega)``, then the SVD of the small ``Q^T J``. Uses ``(k + oversample)(2 power_iters + 2)``
    JVPs/VJPs of the whole batch, never the full matrix; the top values converge like
    ``(sigma_{k+p+1} / sigma_j)^(2 q + 1)``.
    """
    n = int(np.prod(x.shape[1:]))
    f = _flat_fn(fn, x.shape[1:])
    xf = tf.reshape(x, [-1, n])
    m = int(f(xf[:1]).shape[-1])
    l = min(k + oversample, m, n)
    seed = tf.reshape(tf.cast(tf.convert_to_tensor(seed), tf.int64), [-1])[0]
    omega = tf.random.stateless_normal([tf.shape(xf)[0], n, l], tf.stack([seed, 17]), dtype=xf.dtype)
    forward = lambda c: jvp(f, xf, c)  # noqa: E731
    backward = lambda c: vjp(f, xf, c)  # noqa: E731
    q, _ = tf.linalg.qr(_columns(forward, omega))  # [B, m, l]
    for _ in range(power_iters):  # static, few: re-orthonormalised each half-step (Alg. 4.4)
        z, _ = tf.linalg.qr(_columns(backward, q))
        q, _ = tf.linalg.qr(_columns(forward, z))
    bt = _columns(backward, q)  # [B, n, l] = (Q^T J)^T
    s = tf.linalg.svd(tf.cast(bt, tf.float64), compute_uv=False)
    return tf.cast(s[:, :k], tf.float32)


def hutchinson_moments(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, probes: int = 8,
                       seed: Any = 0) -> dict[str, tf.Tensor]:
    """``mean_sq = tr(J^T J)/n``, ``var_sq = tr((J^T J)^2)/n - mean_sq^2`` and ``rel_var_sq`` per example, ``[B]``.

    Hutchinson 1990; Pennington et al. 2017 (the first two moments of the spectrum of J J^T). Each Rademacher
    probe z costs one JVP (``||J z||^2``) and one VJP (``||J^T J z||^2``). Both moment estimates are
    unbiased; ``var_sq`` (their difference with a square) is biased up by Var(mean_sq estimate).
    """
    n = int(np.prod(x.shape[1:]))
    f = _flat_fn(fn, x.shape[1:])
    xf = tf.reshape(x, [-1, n])
    seed = tf.reshape(tf.cast(tf.convert_to_tensor(seed), tf.int64), [-1])[0]
    nb = tf.shape(xf)[0]

    def body(k, s1, s2):
        z = tf.random.stateless_uniform([nb, n], tf.stack([seed, tf.cast(k, tf.int64) + 1]), 0, 2, tf.int32)
        z = tf.cast(2 * z - 1, xf.dtype)
        u = jvp(f, xf, z)
        w = vjp(f, xf, u)
        return (k + 1, s1 + tf.reduce_sum(tf.cast(tf.square(u), tf.float64), -1),
                s2 + tf.reduce_sum(tf.cast(tf.square(w), tf.float64), -1))

    zero = tf.zeros([nb], tf.float64)
    _, s1, s2 = tf.while_loop(lambda k, *_: k < probes, body, (tf.constant(0), zero, zero),
                              maximum_iterations=probes)
    return _moments(s1 / (probes * n), s2 / (probes * n))


def jacobian_spectrum(fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, method: str | None = None,
                      k: int = 8, probes: int = 8, seed: Any = 0) -> dict[str, tf.Tensor]:
    """Spectrum of each example's Jacobian of ``fn`` at ``x [B, ...]`` (a few examples).

    Args:
        fn: example-wise map, e.g. :func:`io_path`'s model called with ``training=False``.
        x: the examples' values of the start tensor (tapped in the step, or computed from a probe batch).
        method: ``exact``, ``randomized`` or None (:func:`choose_method` on the static sizes).
        k, probes, seed: the randomized method's number of top singular values and Hutchinson probes.

    Returns:
        ``singular_values`` ``[B, r]`` (exact: all ``min(m, n)``, descending; randomized: the top ``k``),
        ``mean_sq``, ``var_sq`` and ``rel_var_sq`` ``[B]`` (float32), and ``method``.
    """
    n = int(np.prod(x.shape[1:]))
    m = int(np.prod(fn(x[:1]).shape[1:]))
    method = method or choose_method(m, n)
    if method == EXACT:
        out = exact_spectrum(fn, x)
    elif method == RANDOMIZED:
        out = dict(hutchinson_moments(fn, x, probes, seed))
        out["singular_values"] = randomized_top_singular_values(fn, x, k, seed=seed)
    else:
        raise ValueError(f"method must be {EXACT} or {RANDOMIZED}, got {method!r}")
    out["method"] = method
    return out


# ------------------------------------------------------------------------------------------- blocks


def block_paths(model: keras.Model, blocks: Sequence[tuple[str, Sequence[Any]]] | None = None
                ) -> list[tuple[str, keras.Model]]:
    """``[(block name, sub-model from the block's input to its output)]`` (build once, outside the step)."""
    return [(name, path_model(model, i, o)) for name, i, o in block_boundaries(model, blocks)]


def block_inputs_model(model: keras.Model, blocks: Sequence[tuple[str, Sequence[Any]]] | None = None
                       ) -> keras.Model:
    """``model.inputs -> [input of every block]`` (the values to differentiate the blocks at)."""
    return keras.Model(model.inputs, [i for _, i, _ in block_boundaries(model, blocks)])


def block_mean_sq_singular_values(paths: Sequence[tuple[str, keras.Model]], inputs: Sequence[tf.Tensor],
                                  probes: int = 4, seed: Any = 0, exact: bool = False) -> tf.Tensor:
    """``[n_blocks]`` float32 ``||J_b||_F^2 / n_b`` averaged over the examples: each block's gain.

    Pennington et al. 2017 (chi: the mean squared singular value of a layer's Jacobian; 1 at criticality).
    By Hutchinson with ``probes`` Rademacher JVPs per block (``E ||J z||^2 = ||J||_F^2``), or ``exact`` from
    the full block Jacobians (tests, small blocks). The product over blocks is the input-output
    ``mean_sq`` only for isotropic blocks; the figure shows where the spectrum spreads.
    """
    out = []
    seed = tf.reshape(tf.cast(tf.convert_to_tensor(seed), tf.int64), [-1])[0]
    for b, ((_, sub), x) in enumerate(zip(paths, inputs)):
        fn = lambda t, sub=sub: sub(t, training=False)  # noqa: E731
        if exact:
            out.append(tf.reduce_mean(exact_spectrum(fn, x)["mean_sq"]))
            continue
        n = int(np.prod(x.shape[1:]))
        f, xf = _flat_fn(fn, x.shape[1:]), tf.reshape(x, [-1, n])

        def body(k, s, f=f, xf=xf, b=b):
            z = tf.random.stateless_uniform(tf.shape(xf), tf.stack([seed, tf.cast(1000 * b + k, tf.int64)]), 0, 2,
                                            tf.int32)
            u = jvp(f, xf, tf.cast(2 * z - 1, xf.dtype))
            return k + 1, s + tf.reduce_mean(tf.reduce_sum(tf.cast(tf.square(u), tf.float64), -1))

        _, s = tf.while_loop(lambda k, _: k < probes, body, (tf.constant(0), tf.constant(0.0, tf.float64)),
                             maximum_iterations=probes)
        out.append(tf.cast(s / (probes * n), tf.float32))
    return tf.stack(out)


# ------------------------------------------------------------------------------------------ instrument


class JacobianOptions(Options):
    """``capture.instruments.jacobian``: ``true`` or these options."""

    every: Optional[int] = Field(None, gt=0)  # also every N optimizer steps (host side); null: init and end only
    examples: int = Field(4, gt=0, le=256)  # the first examples of the first training batch (fixed)
    method: Literal["auto", "exact", "randomized"] = "auto"  # auto: choose_method (exact up to 512 x 512)
    k: int = Field(8, gt=0)  # randomized: top singular values kept
    probes: int = Field(8, gt=0)  # randomized: Hutchinson probes of mean_sq / var_sq
    block_probes: int = Field(4, ge=0)  # Hutchinson probes per block of jacobian_blocks (0: no per-block table)
    seed: int = 0  # the probes' and the random subspace's seed


_STEP_COLS = (Column("step", "optimizer step whose weights the snapshot saw (0: at init)"),
              Column("epoch", "epoch of that step"),
              Column("when", "init (before training), step (every N steps) or end"))


class JacobianSpectrum(Instrument):
    """Singular values of the input-output Jacobian (first block's input -> last block's output), per example.

    A snapshot instrument: computed on the host between steps (at init, every ``every`` steps, at the end of
    training) by its own ``tf.function`` on a few fixed examples, in inference mode, never in the compiled
    train step: the spectrum of a fixed set of examples at chosen moments is what dynamical isometry is about,
    and an SVD per captured step inside the step would cost more than the step itself.
    """

    name = "jacobian"
    table = "jacobian"
    order = 90
    default = False
    snapshot_only = True
    Opts = JacobianOptions
    columns = (
        *_STEP_COLS,
        Column("example", "index of the fixed example (the first examples of the first training batch)"),
        Column("method", "exact (full SVD) or randomized (top k + Hutchinson moments)"),
        Column("n_in", "size of the Jacobian's input (the first block's input, per example)"),
        Column("n_out", "size of its output (the last block's output)"),
        Column("mean_sq", "mean squared singular value ||J||_F^2 / n_in (chi^L of Pennington et al.)"),
        Column("var_sq", "variance of the n_in eigenvalues of J^T J (the squared singular values)"),
        Column("rel_var_sq", "var_sq / mean_sq^2: the spread free of the overall gain"),
        Column("sv_max", "largest singular value"),
        Column("sv_min", "smallest of the min(n_in, n_out) singular values (exact method only, else NaN)"),
    )
    more_tables = (
        ("jacobian_sv", (*_STEP_COLS, Column("example", "index of the fixed example"),
                         Column("rank", "0 for the largest singular value"),
                         Column("singular_value", "singular value (exact: all min(n_in, n_out); randomized: top k)"))),
        ("jacobian_blocks", (*_STEP_COLS, Column("depth", "block index"), Column("block", "block name"),
                             Column("mean_sq", "the block's mean squared singular value ||J_b||_F^2 / n_b, "
                                               "over the examples (Hutchinson, block_probes)"))),
    )

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.snapshot_every = self.options.every
        self._x: Any = None
        self._fn: Any = None

    def applies(self) -> bool:
        spec = self.spec
        if not spec.graph or not spec.views:
            return False
        net = spec.net
        try:
            blocks = None if all(v.source == "zoo" for v in spec.views) else \
                [(v.name, [l for l in v.layers.values() if isinstance(l, keras.layers.Layer)]) for v in spec.views]
            bounds = block_boundaries(net, blocks)
            if len(bounds) != spec.n_blocks:
                raise ValueError(f"{len(bounds)} block boundaries for {spec.n_blocks} blocks")
            self._bounds = bounds
            self._start = keras.Model(net.inputs, bounds[0][1], name=f"{net.name}_jacobian_start")
            self._path = path_model(net, bounds[0][1], bounds[-1][2])
            self._blocks = block_paths(net, blocks) if self.options.block_probes else []
            self._block_in = block_inputs_model(net, blocks) if self.options.block_probes else None
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            spec.notes.append(f"no Jacobian spectrum (jacobian): {str(err).splitlines()[0][:200]}")
            return False
        self.n_in = int(np.prod(bounds[0][1].shape[1:]))
        self.n_out = int(np.prod(bounds[-1][2].shape[1:]))
        self.method = choose_method(self.n_out, self.n_in) if self.options.method == "auto" else self.options.method
        return True

    def _compute(self) -> Any:
        o, method = self.options, self.method

        def run(x: Any) -> dict[str, Any]:
            start = self._start(x, training=False)
            out = jacobian_spectrum(lambda t: self._path(t, training=False), start, method, k=o.k, probes=o.probes,
                                    seed=o.seed)
            out.pop("method")
            if self._blocks:
                ins = self._block_in(x, training=False)
                ins = list(ins) if isinstance(ins, (list, tuple)) else [ins]
                out["blocks"] = block_mean_sq_singular_values(self._blocks, ins, probes=o.block_probes, seed=o.seed)
            return out

        return tf.function(run, reduce_retracing=True)

    def spectrum(self, x: Any) -> dict[str, np.ndarray]:
        """The values of one snapshot at the current weights for the inputs ``x`` (NumPy)."""
        if self._fn is None:
            self._fn = self._compute()
        return {k: v.numpy() for k, v in self._fn(x).items()}

    def snapshot(self, x: Any, when: str) -> dict[str, pd.DataFrame]:
        if self._x is None:  # the same examples at every snapshot of the arm
            self._x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t)[: self.options.examples], x)
        got = self.spectrum(self._x)
        s = got["singular_values"]
        b, r = s.shape
        head = {"step": self.snapshot_step, "when": when}
        main = pd.DataFrame({**head, "example": np.arange(b), "method": self.method, "n_in": self.n_in,
                             "n_out": self.n_out, "mean_sq": got["mean_sq"], "var_sq": got["var_sq"],
                             "rel_var_sq": got["rel_var_sq"], "sv_max": s[:, 0],
                             "sv_min": s[:, -1] if self.method == EXACT else np.nan})
        sv = pd.DataFrame({**head, "example": np.repeat(np.arange(b), r), "rank": np.tile(np.arange(r), b),
                           "singular_value": s.reshape(-1)})
        out = {self.table: main, "jacobian_sv": sv}
        if "blocks" in got:
            out["jacobian_blocks"] = pd.DataFrame({**head, "depth": self.spec.blocks["depth"].to_numpy(),
                                                   "block": self.spec.blocks["block"].to_numpy(),
                                                   "mean_sq": got["blocks"]})
        return out

    @classmethod
    def tensorboard(cls, tables: dict[str, pd.DataFrame], events: Any) -> None:
        """``jacobian/<column>`` (mean over the examples) and ``jacobian_blocks/<block>`` per snapshot step."""
        t = tables.get("jacobian")
        if t is not None and not t.empty:
            m = t.groupby("step", as_index=False)[["mean_sq", "rel_var_sq", "sv_max", "sv_min"]].mean()
            for col in ("mean_sq", "rel_var_sq", "sv_max", "sv_min"):
                events.scalars(m, "step", col, f"jacobian/{col}")
        b = tables.get("jacobian_blocks")
        for block, g in (b.groupby("block", sort=False) if b is not None and not b.empty else []):
            events.scalars(g, "step", "mean_sq", f"jacobian_blocks/{block}")
