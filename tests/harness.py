"""The shared instrument harness (in the style of keras-hub's ``run_layer_test``).

For a zoo model and a batch, :func:`run_instrument_test` gets three versions of every column an instrument
writes and asserts they agree:

1. **in graph**: the probe's value at step 0 of a real ``fit`` (one SGD step, everything captured);
2. **measure()**: the same instruments run eagerly on the initial weights;
3. **reference**: an independent computation from :data:`REFERENCES`: a hand-written ``tf.GradientTape``
   over the model's own layers (found by their zoo names, never through the probe's spec), a hand-written
   cross-entropy, float64 NumPy for every reduction, analytic activation derivatives.

A new instrument gets its test by adding one entry to :data:`REFERENCES` (``test_instruments.py`` fails for a
registered instrument without one).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

import zoo
from ablations.probe import DrainCallback, ProbedModel, measure_tables

LR = 0.01
N_OUT = 10
JACOBIAN_EXAMPLES = 3
JACOBIAN_MODELS = ("plain_mlp", "resnet_mlp", "rezero_mlp", "resnet_cnn", "transformer")

# Small instances of every zoo family; ReZero starts at alpha = 0.3 so its branches get gradients, stochastic
# depth keeps every branch (its draws differ between the fit and the references; `active` itself is checked
# against the branches in test_instruments.py).
MODELS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "plain_mlp": ((8, 8, 1), dict(depth=3, width=8, activation="tanh", bias_init_std=0.1)),
    "resnet_mlp": ((8, 8, 1), dict(depth=3, width=8, activation="sigmoid")),
    "highway_mlp": ((8, 8, 1), dict(depth=3, width=8, gate_bias=-1.0)),
    "densenet_mlp": ((8, 8, 1), dict(depth=3, width=8, growth_rate=4)),
    "stochastic_depth_mlp": ((8, 8, 1), dict(depth=3, width=8, survival_prob=1.0)),
    "rezero_mlp": ((8, 8, 1), dict(depth=3, width=8, alpha_init=0.3)),
    "plain_cnn": ((8, 8, 1), dict(depth=3, width=4)),
    "resnet_cnn": ((8, 8, 1), dict(depth=3, width=4)),
    "highway_cnn": ((8, 8, 1), dict(depth=3, width=4)),
    "densenet_cnn": ((8, 8, 1), dict(depth=3, width=4, growth_rate=2)),
    "stochastic_depth_cnn": ((8, 8, 1), dict(depth=3, width=4, survival_prob=1.0)),
    "rezero_cnn": ((8, 8, 1), dict(depth=3, width=4, alpha_init=0.3)),
    "simple_rnn": ((6, 3), dict(depth=2, units=5)),
    "lstm": ((6, 3), dict(depth=2, units=5)),
    "gru": ((6, 3), dict(depth=2, units=5)),
    "transformer": ((6, 4), dict(depth=2, d_model=8, heads=2, ffn_width=16, activation="gelu")),
    "transformer/rezero": ((6, 4), dict(depth=2, d_model=8, heads=2, ffn_width=16, norm_position="none",
                                        residual="rezero")),
    # Variants ("<arch>/<what>"): an activation with weights, whose statistics must use the forward pass's
    # slopes (the reference reads them before the update), and dead ReLU units.
    "plain_mlp/prelu": ((8, 8, 1), dict(depth=3, width=8, activation="prelu", activation_options={"alpha_init": -0.5},
                                        bias_init_std=0.5)),
    "plain_mlp/dead_relu": ((8, 8, 1), dict(depth=3, width=8, activation="relu", bias_init_std=1.5)),
    # Without batch norm (it couples the examples): convolutions for the per-example statistics.
    "resnet_cnn/no_norm": ((8, 8, 1), dict(depth=3, width=4, norm="none")),
}
# Opt-in instruments the harness switches on, and on which models (None: all of them). per_example's
# reference is a tape per example, so it runs on one model per family it covers (MLP, residual MLP, CNN,
# transformer, SimpleRNN, LSTM and GRU (from the through-time dL/dh_t)).
CAPTURE = {"histograms": True}
OPT_IN: dict[str, tuple[str, ...] | None] = {
    "init_distance": None,
    "spectral_norm": None,
    "per_example": ("plain_mlp", "resnet_mlp", "resnet_cnn/no_norm", "transformer", "simple_rnn", "lstm", "gru"),
}


def capture_for(name: str) -> dict[str, Any]:
    """The harness's capture section for model ``name``."""
    on = {k: True for k, models in OPT_IN.items() if models is None or name in models}
    if name in JACOBIAN_MODELS:
        # The Jacobian spectrum (a host-side snapshot, not a step value) on a few families: each costs explicit
        # per-example Jacobians in the reference. Many block probes: its per-block gains are Hutchinson estimates.
        on["jacobian"] = {"examples": JACOBIAN_EXAMPLES, "block_probes": 256}
    return {**CAPTURE, "instruments": {**on, **EXTRA.get(name, {})}}


# Opt-in instruments switched on for some models only (their references are costly): model -> instruments.
# Curvature: enough power iterations that the top eigenvalue of these tiny nets has converged to < 1%; models
# without BatchNorm (its moving statistics move with every training-mode pass the harness makes, and the
# curvature's loss reads them).
EXTRA: dict[str, dict[str, Any]] = {
    "plain_mlp": {"curvature": {"every": 1, "iterations": 60, "probes": 8}},  # residual 6e-5 at 60
    "resnet_mlp": {"curvature": {"every": 1, "iterations": 60, "probes": 8}},  # residual 3e-7 at 60
}


@dataclasses.dataclass
class Case:
    """One model's three versions of every table, and what a reference needs."""

    name: str
    net: keras.Model
    x: np.ndarray
    y: np.ndarray
    w0: list[np.ndarray]  # weights before the step
    w1: list[np.ndarray]  # after it
    graph: dict[str, pd.DataFrame]  # the probe's tables, step 0
    eager: dict[str, pd.DataFrame]  # measure_tables()
    instruments: list[Any]  # the probe's enabled instruments (they apply to this model)
    ref: dict[str, Any]  # the hand-written tape: loss, grads, layer inputs/outputs and their gradients

    @contextlib.contextmanager
    def initial_weights(self):
        """The net with its weights before the step (references that run the model themselves)."""
        for v, w in zip(self.net.trainable_variables, self.w0):
            v.assign(w.astype(v.dtype.name if hasattr(v.dtype, "name") else v.dtype))
        try:
            yield self.net
        finally:
            for v, w in zip(self.net.trainable_variables, self.w1):
                v.assign(w.astype(v.dtype.name if hasattr(v.dtype, "name") else v.dtype))


def _loss(y: np.ndarray, logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy by hand (float64 log-softmax)."""
    z = tf.cast(logits, tf.float64)
    z = z - tf.reduce_max(z, axis=-1, keepdims=True)
    log_p = z - tf.math.log(tf.reduce_sum(tf.exp(z), axis=-1, keepdims=True))
    return -tf.reduce_mean(tf.gather(log_p, y, axis=-1, batch_dims=1))


def hand_tape(net: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Loss, weight gradients, and every layer's input/output with its gradient, from one tape over the
    net's own layers (a functional view exposing every tagged layer's input and output)."""
    tagged = [layer for layer in net.layers if zoo.parse_layer_name(layer.name)]
    outs = {}
    for layer in tagged:
        outs[f"{layer.name}:out"] = layer.output
        ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        for i, t in enumerate(ins):
            outs[f"{layer.name}:in{i}"] = t
    keys = list(outs)
    view = keras.Model(net.inputs, [net.output, *outs.values()])
    with tf.GradientTape() as tape:
        res = view(x, training=True)
        loss = _loss(y, res[0])
    inner = list(res[1:])
    grads = tape.gradient(loss, net.trainable_variables + inner)
    nv = len(net.trainable_variables)
    return {"loss": float(loss), "grads": [np.asarray(g, np.float64) for g in grads[:nv]],
            "values": {k: np.asarray(v, np.float64) for k, v in zip(keys, inner)},
            "value_grads": {k: (np.asarray(g, np.float64) if g is not None else None)
                            for k, g in zip(keys, grads[nv:])}}


def make_case(name: str, batch: int = 16, seed: int = 0) -> Case:
    shape, opts = MODELS[name]
    keras.utils.set_random_seed(seed)
    net = zoo.build(name.split("/")[0], input_shape=shape, num_outputs=N_OUT, **opts)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, N_OUT, size=batch).astype(np.int64)
    capture = capture_for(name)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    w0 = [np.array(v, np.float64) for v in net.trainable_variables]
    ref = hand_tape(net, x, y)
    eager = measure_tables(net, (x, y), loss, training=True, capture=capture)
    model = ProbedModel(net, capture=capture, capacity=4)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=loss)
    drain = DrainCallback(drain_every=256, steps_per_epoch=1)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch), epochs=1, verbose=0, callbacks=[drain],
              shuffle=False)
    w1 = [np.array(v, np.float64) for v in net.trainable_variables]
    graph = drain.tables(model)
    return Case(name, net, x, y, w0, w1, graph, eager, list(model.instruments), ref)


# ------------------------------------------------------------------------------------- the references


def _block_rows(case: Case) -> list[str]:
    return list(case.graph["blocks"]["block"])


def _layer(case: Case, name: str) -> Any:
    try:
        return case.net.get_layer(name)
    except ValueError:
        return None


def ref_step(case: Case) -> dict[str, np.ndarray]:
    g = np.sqrt(sum(float(np.sum(a ** 2)) for a in case.ref["grads"]))
    return {"loss": np.array([case.ref["loss"]]), "global_grad_norm": np.array([g]), "lr": np.array([LR])}


def ref_param_norms(case: Case) -> dict[str, np.ndarray]:
    return {"grad_norm": np.array([np.linalg.norm(g) for g in case.ref["grads"]]),
            "weight_norm": np.array([np.linalg.norm(w) for w in case.w0]),
            "update_norm": np.array([np.linalg.norm(b - a) for a, b in zip(case.w0, case.w1)])}


def ref_preact_grad(case: Case) -> dict[str, np.ndarray]:
    out = []
    for block in _block_rows(case):
        g = case.ref["value_grads"].get(f"{block}_linear:out")
        out.append(np.linalg.norm(g) if g is not None else np.nan)
    return {"act_grad_norm": np.array(out)}


def _derivative(layer: Any, z: np.ndarray, before: dict[int, np.ndarray]) -> tuple[np.ndarray, float]:
    """Analytic derivative of a zoo activation layer at ``z`` and its maximum over the real line
    (``before``: weights before the update, by variable id, for layers with weights)."""
    kind = getattr(getattr(layer, "activation", None), "__name__", type(layer).__name__)
    if kind == "PReLU":  # one slope per unit for z < 0, the forward pass's (pre-update) slopes
        alpha = before[id(layer.alpha)]
        return np.where(z > 0, 1.0, np.broadcast_to(alpha, z.shape)), float(max(1.0, np.abs(alpha).max()))
    if kind == "tanh":
        return 1.0 - np.tanh(z) ** 2, 1.0
    if kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 - s), 0.25
    if kind == "relu":
        return (z > 0).astype(np.float64), 1.0
    if kind == "gelu":  # Keras' default GELU is the exact erf form: x * Phi(x)
        from scipy.special import erf

        phi = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
        d = 0.5 * (1 + erf(z / np.sqrt(2))) + z * phi
        grid = np.linspace(-20, 20, 400001)
        dg = 0.5 * (1 + erf(grid / np.sqrt(2))) + grid * np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi)
        return d, float(np.max(np.abs(dg)))
    raise NotImplementedError(f"no analytic derivative for {kind} in the harness")


def ref_activation(case: Case) -> dict[str, np.ndarray]:
    cols = {c: [] for c in ("act_mean", "act_std", "act_saturation", "act_dead")}
    for block in _block_rows(case):
        layer = _layer(case, f"{block}_act")
        if layer is None:
            for v in cols.values():
                v.append(np.nan)
            continue
        z = case.ref["values"][f"{block}_act:in0"]
        a = case.ref["values"][f"{block}_act:out"]
        d, max_d = _derivative(layer, z, {id(v): w for v, w in zip(case.net.trainable_variables, case.w0)})
        cols["act_mean"].append(a.mean())
        cols["act_std"].append(a.std())
        cols["act_saturation"].append(np.mean(np.abs(d) < 0.05 * max_d))
        cols["act_dead"].append(np.mean(np.all(d.reshape(len(d), -1) == 0, axis=0)))
    return {k: np.array(v) for k, v in cols.items()}


def ref_residual(case: Case) -> dict[str, np.ndarray]:
    out = []
    for block in _block_rows(case):
        skip, branch = case.ref["values"].get(f"{block}_add:in0"), case.ref["values"].get(f"{block}_add:in1")
        out.append(np.linalg.norm(branch) / np.linalg.norm(skip) if skip is not None and branch is not None
                   else np.nan)
    return {"branch_ratio": np.array(out)}


def ref_gate(case: Case) -> dict[str, np.ndarray]:
    return {"gate_mean": np.array([case.ref["values"][f"{b}_gate:out"].mean() if f"{b}_gate:out" in case.ref["values"]
                                   else np.nan for b in _block_rows(case)])}


def ref_block_scalars(case: Case) -> dict[str, np.ndarray]:
    out = {"alpha": [], "active": []}
    before = {id(v): w for v, w in zip(case.net.trainable_variables, case.w0)}  # alpha before the update
    for block in _block_rows(case):
        for name in out:
            ws = [w for layer in case.net.layers if layer.name.startswith(block + "_") for w in layer.weights
                  if w.name == name]
            vals = [float(before.get(id(w), w.numpy())) for w in ws]
            # Several per block (a ReZero transformer layer's two alphas): the largest |alpha|, signed; mean active.
            pick = (lambda v: max(v, key=abs)) if name == "alpha" else (lambda v: float(np.mean(v)))
            out[name].append(pick(vals) if vals else np.nan)
    # `active` is written by the forward pass; with every branch kept it is 1 (its initial value too).
    return {k: np.array(v) for k, v in out.items()}


def ref_grad_hist(case: Case) -> pd.DataFrame:
    """Per block, counts of |dL/dW| of its kernels per binary exponent (NumPy frexp), zeros apart."""
    from ablations.instruments.grad_hist import HIST_BINS, HIST_EXP_LO

    rows = []
    params = case.graph["params"]
    for block in _block_rows(case):
        idx = [i for i, (b, p, r) in enumerate(zip(params["block"], params["param"], params["role"]))
               if b == block and r == "block" and str(p).endswith("kernel")]
        if not idx:
            continue
        g = np.abs(np.concatenate([case.ref["grads"][i].astype(np.float32).ravel() for i in idx]))
        _, e = np.frexp(g[g > 0])
        counts = np.bincount(np.clip(e - 1 - HIST_EXP_LO, 0, HIST_BINS - 1), minlength=HIST_BINS)
        rows.append((block, np.append(counts, np.sum(g == 0))))
    return pd.DataFrame({"block": [b for b, _ in rows], "counts": [c for _, c in rows]})


def ref_time_grads(case: Case) -> dict[str, np.ndarray]:
    """||dL/dh_t|| per recurrent layer and t by an explicitly unrolled loop (tests/test_rnn.py)."""
    from test_rnn import unrolled_reference

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with case.initial_weights() as net:
        _, grads = unrolled_reference(net, case.x, case.y, loss, False)
    return {"act_grad_norm": np.stack([np.sqrt((g ** 2).sum(axis=(0, 2))) for g in grads])}


def ref_init_distance(case: Case) -> dict[str, np.ndarray]:
    """Step 0 reads the weights before its update: the initial ones (the probe copied them when built)."""
    dist = np.array([np.linalg.norm(w - w) for w in case.w0])
    w0 = np.array([np.linalg.norm(w) for w in case.w0])
    return {"init_distance": dist, "init_distance_ratio": np.where(w0 > 0, dist / np.where(w0 > 0, w0, 1.0), np.nan)}


def ref_spectral_norm(case: Case) -> dict[str, np.ndarray]:
    """NumPy's SVD of every kernel as a matrix ([..., out] -> [prod(...), out]; attention's query/key/value
    [d, heads, head_dim] -> [d, heads * head_dim]); the probe's first capture starts exact, so it converges."""
    sigma = []
    for v, w in zip(case.net.trainable_variables, case.w0):
        if w.ndim < 2 or v.path.rsplit("/", 1)[-1] not in ("kernel", "recurrent_kernel", "pointwise_kernel", "embeddings"):
            sigma.append(np.nan)
            continue
        qkv = w.ndim == 3 and v.path.rsplit("/", 2)[-2] in ("query", "key", "value")
        m = w.reshape(w.shape[0], -1) if qkv else w.reshape(-1, w.shape[-1])
        sigma.append(np.linalg.svd(m, compute_uv=False)[0])
    sigma = np.array(sigma)
    return {"spectral_norm": sigma, "spectral_norm_converged": np.where(np.isnan(sigma), np.nan, 1.0)}


def per_example_grads(case: Case) -> list[np.ndarray]:
    """Per trainable tensor, the [B, size] float64 gradients of each example's own loss, one tape each."""
    with case.initial_weights() as net:
        rows = []
        for i in range(len(case.x)):
            with tf.GradientTape() as tape:
                loss = _loss(case.y[i:i + 1], net(case.x[i:i + 1], training=True))
            grads = tape.gradient(loss, net.trainable_variables)
            rows.append([np.zeros(int(np.prod(v.shape))) if g is None else
                         np.asarray(tf.convert_to_tensor(g), np.float64).ravel()
                         for g, v in zip(grads, net.trainable_variables)])
    return [np.stack([r[k] for r in rows]) for k in range(len(rows[0]))]


def ref_per_example(case: Case) -> pd.DataFrame:
    """Per row (a block's covered kernels, or every covered tensor: which tensors a row covers is the
    instrument's declaration), NumPy noise statistics of the per-example tapes' gradients."""
    from ablations.instruments.per_example import numpy_noise_statistics

    inst = next(i for i in case.instruments if i.name == "per_example")
    cov = inst.coverage
    per = per_example_grads(case)
    out = []
    for block, depth, idx, _ in cov.groups:
        g = np.concatenate([per[cov.rows[k]] for k in idx], axis=1)
        out.append({"block": block, "depth": depth, **numpy_noise_statistics(g)})
    df = pd.DataFrame(out)
    df.attrs["rtol"] = {"mean_norm": 1e-5}  # the per-example norms themselves: the bound
    return df


def explicit_hessian(net: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The Hessian of the hand-written cross-entropy (layers in inference mode) w.r.t. every trainable weight,
    as the jacobian of the gradient (float64 NumPy, symmetrised)."""
    variables = net.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = _loss(y, net(x, training=False))
        g = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(loss, variables)], 0)
    n = int(g.shape[0])
    h = np.concatenate([np.reshape(np.asarray(j, np.float64), [n, -1]) for j in outer.jacobian(g, variables)], 1)
    return (h + h.T) / 2


def ref_curvature(case: Case) -> dict[str, Any]:
    """NumPy ``eigvalsh`` of the explicit Hessian at the weights before the step: the eigenvalue of largest
    magnitude (signed), the exact trace, and z.Hz averaged over the instrument's Rademacher probes (regenerated
    from its seeds), with the stability bound of plain SGD at LR."""
    from ablations.instruments import curvature as cv

    probes = EXTRA[case.name]["curvature"]["probes"]
    with case.initial_weights() as net:
        h = explicit_hessian(net, case.x, case.y)
        shapes, dtypes = [v.shape for v in net.trainable_variables], [v.dtype for v in net.trainable_variables]
    ev = np.linalg.eigvalsh(h)
    zs = [cv._flat(cv._random(shapes, dtypes, tf.constant([cv.TRACE_SEED, k + 1], tf.int64), "rademacher")).numpy()
          for k in range(probes)]
    return {"sharpness": float(ev[np.argmax(np.abs(ev))]), "trace": float(np.trace(h)),
            "trace_same_probes": float(np.mean([z @ h @ z for z in zs])), "lr": LR, "stability_bound": 2.0 / LR,
            "eigenvalues": ev}


def _explicit_jacobians(fn: Callable[[Any], Any], x: np.ndarray) -> np.ndarray:
    """[B, m, n] float64: one tape and ``tape.jacobian`` per example (no batch_jacobian, no probe code)."""
    @tf.function  # traced once per fn: eagerly, a jacobian without pfor is m Python-level backward passes
    def one(xi: Any) -> Any:
        with tf.GradientTape(persistent=True) as tape:  # persistent: needed without pfor
            tape.watch(xi)
            y = tf.reshape(fn(tf.reshape(xi, (1, *x.shape[1:]))), [-1])
        # No pfor: its vectorised jacobian of MultiHeadAttention segfaults in TF 2.21 (seen on the transformer).
        return tape.jacobian(y, xi, experimental_use_pfor=False)

    out = [np.asarray(one(tf.constant(x[i:i + 1].reshape(1, -1), tf.float32)))[:, 0, :].astype(np.float64)
           for i in range(len(x))]
    return np.stack(out)


def ref_jacobian(case: Case) -> dict[str, np.ndarray]:
    """Singular values of the explicit input-output Jacobian of the first examples (NumPy SVD, float64), its
    eigenvalue moments over n_in (zero-padded), and every block's ||J_b||_F^2 / n_b from explicit block
    Jacobians, at the initial weights; blocks from the zoo's names (block_<i>_*), not the probe's spec."""
    from ablations.instruments.jacobian import block_boundaries

    with case.initial_weights() as net:
        bounds = block_boundaries(net)
        x = case.x[:JACOBIAN_EXAMPLES]
        values = keras.Model(net.inputs, [b[1] for b in bounds])(x, training=False)
        values = [np.asarray(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
        io = keras.Model(bounds[0][1], bounds[-1][2])
        jac = _explicit_jacobians(lambda t: io(t, training=False), values[0])
        blocks = []
        for (_, start, end), v in zip(bounds, values):
            sub = keras.Model(start, end)
            jb = _explicit_jacobians(lambda t, sub=sub: sub(t, training=False), v)
            blocks.append(float(np.mean((jb ** 2).sum(axis=(1, 2)) / jb.shape[2])))
    s = np.linalg.svd(jac, compute_uv=False)
    n = jac.shape[2]
    s2 = np.zeros((len(s), n))
    s2[:, : s.shape[1]] = s ** 2
    return {"singular_value": s, "mean_sq": s2.mean(1), "var_sq": s2.var(1), "blocks": np.array(blocks)}


REFERENCES: dict[str, Callable[[Case], Any]] = {
    "step": ref_step,
    "param_norms": ref_param_norms,
    "preact_grad": ref_preact_grad,
    "activation": ref_activation,
    "residual": ref_residual,
    "gate": ref_gate,
    "block_scalars": ref_block_scalars,
    "grad_hist": ref_grad_hist,
    "time_grads": ref_time_grads,
    "init_distance": ref_init_distance,
    "spectral_norm": ref_spectral_norm,
    "per_example": ref_per_example,
    "curvature": ref_curvature,
    "jacobian": ref_jacobian,  # a snapshot: compared in test_instruments.py::_jacobian
}
# Instruments checked elsewhere against their own references (snapshots, not step values).
ELSEWHERE = {"rnn_gates": "tests/test_rnn.py::test_gate_values_match_numpy (NumPy gates from the weights)"}
