"""The probe's statistics against an independent computation.

The reference below never touches Keras layers or the probe: it reads the Dense weights as arrays, runs the
forward pass with plain TensorFlow ops in float64 under its own ``tf.GradientTape``, takes the cross-entropy
with a hand-written log-softmax, and derives activation derivatives analytically in NumPy. Training runs are
replayed step by step with hand-written SGD (and the first Adam step in closed form).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import ablations
import zoo
from ablations import instruments
from ablations.instruments.activation import SATURATION_FRACTION, max_derivative
from ablations.instruments.kernels import norms
from ablations.probe import DrainCallback, ProbedModel, ring_capacity
from zoo.activations import make_activation

INPUT_SHAPE = (8, 8, 1)
N_OUT = 10
RTOL = 1e-5

PARAM_COLUMNS = ["step", "epoch", "depth", "block", "layer", "param", "role", "size", "grad_norm", "weight_norm",
                 "update_norm", "update_ratio"]
BLOCK_COLUMNS = ["step", "epoch", "depth", "block", "act_grad_norm", "act_mean", "act_std", "act_saturation",
                 "act_dead", "branch_ratio", "gate_mean", "alpha", "active"]
HISTORY_COLUMNS = ["step", "epoch", "loss", "global_grad_norm", "lr", "grad_decay_rate"]
BLOCK_STATS = BLOCK_COLUMNS[4:]


# ------------------------------------------------------------------------------------------ reference


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# name -> (forward in tf, derivative in numpy, max derivative)
ACTIVATIONS = {
    "sigmoid": (lambda z: 1.0 / (1.0 + tf.exp(-z)), lambda z: _sigmoid(z) * (1.0 - _sigmoid(z)), 0.25),
    "tanh": (lambda z: (tf.exp(z) - tf.exp(-z)) / (tf.exp(z) + tf.exp(-z)), lambda z: 1.0 - np.tanh(z) ** 2, 1.0),
    "relu": (lambda z: tf.where(z > 0, z, tf.zeros_like(z)), lambda z: (z > 0).astype(np.float64), 1.0),
}


def dense_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """{layer name: [kernel, bias]} as float64 copies."""
    return {layer.name: [np.array(layer.kernel, dtype=np.float64), np.array(layer.bias, dtype=np.float64)]
            for layer in model.layers if isinstance(layer, keras.layers.Dense)}


def reference(arch: str, activation: str, depth: int, weights: dict[str, list[np.ndarray]], x, y) -> dict:
    """Loss, per-tensor gradients, dL/dz per block and the activations, in float64 without Keras."""
    act, deriv, max_d = ACTIVATIONS[activation]
    w = {name: [tf.constant(k), tf.constant(b)] for name, (k, b) in weights.items()}
    flat = [t for pair in w.values() for t in pair]
    x = tf.constant(np.asarray(x, np.float64).reshape(len(x), -1))
    y = np.asarray(y)
    zs, acts = [], []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(flat)

        def dense(name, h):
            k, b = w[name]
            return tf.matmul(h, k) + b

        h = dense("stem_linear", x) if arch == "resnet_mlp" else x
        for i in range(depth):
            z = dense(f"block_{i:03d}_linear", h)
            a = act(z)
            zs.append(z)
            acts.append(a)
            h = a if arch == "plain_mlp" else h + dense(f"block_{i:03d}_linear2", a)
        logits = dense("head_linear", h)
        shifted = logits - tf.reduce_max(logits, axis=1, keepdims=True)
        log_p = shifted - tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=1, keepdims=True))
        loss = -tf.reduce_mean(tf.gather(log_p, y, axis=1, batch_dims=1))
    grads = tape.gradient(loss, w)
    dz = tape.gradient(loss, zs)
    zs_np = [z.numpy() for z in zs]
    derivs = [deriv(z) for z in zs_np]
    blocks = []
    for g, a, d in zip(dz, acts, derivs):
        a = a.numpy()
        blocks.append(dict(
            act_grad_norm=np.linalg.norm(g.numpy()),
            act_mean=a.mean(),
            act_std=a.std(),
            act_saturation=np.mean(d < SATURATION_FRACTION * max_d),
            act_dead=np.mean(np.all(d == 0, axis=0)),
        ))
    return dict(
        loss=float(loss),
        grads={(name, p): g.numpy() for name, pair in grads.items() for p, g in zip(("kernel", "bias"), pair)},
        weights={(name, p): v for name, pair in weights.items() for p, v in zip(("kernel", "bias"), pair)},
        blocks=blocks,
        z=zs_np,
        derivs=derivs,
    )


def build(arch, activation, depth=3, width=8, dtype="float64", **kw):
    keras.utils.set_random_seed(1234)
    return zoo.build(arch, input_shape=INPUT_SHAPE, num_outputs=N_OUT, depth=depth, width=width,
                     activation=activation, dtype=dtype, **kw)


def batch(n=16, seed=0, scale=1.0):
    rng = np.random.RandomState(seed)
    x = (scale * rng.uniform(size=(n, *INPUT_SHAPE))).astype(np.float32)
    y = rng.randint(0, N_OUT, size=n).astype(np.int64)
    return x, y


def assert_close(got, want, rtol=RTOL, what=""):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=1e-12,
                               err_msg=what)


def loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------------------------------------------------ measure

MEASURE_CASES = [
    # arch, activation, depth, dtype, builder options
    ("plain_mlp", "sigmoid", 4, "float64",
     dict(initializer="variance_scaling", initializer_options={"scale": 20.0, "distribution": "uniform"},
          bias_init_std=0.5)),
    ("resnet_mlp", "tanh", 3, "float64", dict(bias_init_std=0.3)),
    ("plain_mlp", "tanh", 3, "float32",
     dict(initializer="variance_scaling", initializer_options={"scale": 6.0}, bias_init_std=0.2)),
]


@pytest.mark.parametrize("arch,activation,depth,dtype,opts", MEASURE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in MEASURE_CASES])
def test_measure_matches_independent_computation(arch, activation, depth, dtype, opts):
    model = build(arch, activation, depth=depth, width=16 if dtype == "float32" else 8, dtype=dtype, **opts)
    x, y = batch(16)
    df = ablations.measure(model, (x, y), loss_fn())
    ref = reference(arch, activation, depth, dense_weights(model), x, y)

    assert list(df.columns) == ["depth", "block", "layer", "param", "role", "size", "grad_norm", "weight_norm",
                                "update_norm", "update_ratio", *BLOCK_STATS]
    assert len(df) == len(model.trainable_variables) == len(ref["grads"])
    assert df["update_norm"].isna().all() and df["update_ratio"].isna().all()
    assert_close(df.attrs["loss"], ref["loss"], what="loss")

    for row in df.itertuples():
        key = (row.layer, row.param)
        assert_close(row.grad_norm, np.linalg.norm(ref["grads"][key]), what=f"grad_norm {key}")
        assert_close(row.weight_norm, np.linalg.norm(ref["weights"][key]), what=f"weight_norm {key}")
        assert row.size == ref["weights"][key].size
        role, d = zoo.layer_role(row.layer)
        assert (row.role, row.depth) == (role, d)
        if role == "block":
            assert row.block == row.layer.rsplit("_", 1)[0]
            for stat, want in ref["blocks"][d].items():
                assert_close(getattr(row, stat), want, what=f"{stat} of block {d} ({row.layer})")
        else:
            assert all(math.isnan(getattr(row, s)) for s in BLOCK_STATS)
    # Kernels and biases are both present for every Dense layer.
    assert set(df["param"]) == {"kernel", "bias"}
    assert (df["param"] == "bias").sum() == (df["param"] == "kernel").sum()


def test_vanishing_norms_do_not_underflow_to_zero():
    # A 40-block plain sigmoid MLP in float32: first-block gradients near 1e-25, whose squares underflow
    # float32. The recorded norms must still match the float64 reference.
    depth = 40
    model = build("plain_mlp", "sigmoid", depth=depth, width=8, dtype="float32")
    x, y = batch(16)
    ref = reference("plain_mlp", "sigmoid", depth, dense_weights(model), x, y)
    first = np.linalg.norm(ref["grads"][("block_000_linear", "kernel")])
    assert 0 < first < 1e-19  # the regime the test is about
    df = ablations.measure(model, (x, y), loss_fn())
    for row in df.itertuples():  # relative error only: an absolute tolerance would accept 0
        np.testing.assert_allclose(row.grad_norm, np.linalg.norm(ref["grads"][(row.layer, row.param)]),
                                   rtol=1e-4, atol=0, err_msg=f"grad_norm {row.layer}/{row.param}")
    blocks = df.drop_duplicates("depth").set_index("depth")
    for d in (0, 1, depth - 1):
        np.testing.assert_allclose(blocks.loc[d, "act_grad_norm"], ref["blocks"][d]["act_grad_norm"], rtol=1e-4,
                                   atol=0, err_msg=f"act_grad_norm block {d}")
    # The same numbers from the compiled train step (graph mode: the rescue is a functional If there).
    model, drain, _ = fit_probed(model, keras.optimizers.SGD(learning_rate=0.0), x, y, record=False)
    p = drain.tables(model)["params"]
    for row in p.itertuples():
        np.testing.assert_allclose(row.grad_norm, np.linalg.norm(ref["grads"][(row.layer, row.param)]),
                                   rtol=1e-4, atol=0, err_msg=f"trained grad_norm {row.layer}/{row.param}")
    tiny = [1e-30 * np.arange(1.0, 7.0).reshape(2, 3), np.zeros(4), 1e-3 * np.ones(5)]
    got = norms([tf.constant(t, tf.float32) for t in tiny]).numpy()
    np.testing.assert_allclose(got, [np.linalg.norm(t) for t in tiny], rtol=1e-6)
    # In a graph (the train step) the rescue is a functional If: same numbers, and no Switch nodes.
    fn = tf.function(lambda ts: norms(ts))
    args = [tf.constant(t, tf.float32) for t in tiny]
    np.testing.assert_allclose(fn(args).numpy(), [np.linalg.norm(t) for t in tiny], rtol=1e-6)
    graph = fn.get_concrete_function(args).graph
    ifs = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert ifs and all(not op.get_attr("_lower_using_switch_merge") for op in ifs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rescued_norms_are_exact_across_float32s_range(dtype):
    """Every scale a vanishing or exploding gradient can take, big and small tensors, against float64 NumPy."""
    rng = np.random.default_rng(3)
    # |entries| >= 0.1 * scale: TensorFlow's CPU kernels flush subnormals (< 1.2e-38) to zero, in the
    # train step as everywhere else, so the smallest tensor stays just above that.
    arrays = [scale * rng.choice([-1, 1], shape) * (0.1 + rng.exponential(1.0, shape)) for scale, shape in [
        (1e-37, (64,)), (1e-33, (300, 300)), (1e-25, (8, 8)), (1e-18, (1000,)), (1e-16, (2,)), (1.0, (256, 256)),
        (1e15, (300, 300)), (0.0, (3, 3)), (1.0, (8, 8)), (1e-30, ()), (3.0, ()), (1e-12, (8, 8)), (0.0, ())]]
    # Small tensors of one shape (the three 8x8, the three scalars) are stacked and reduced together, large
    # ones alone: the result keeps the input order.
    arrays.append(np.r_[1e-36, 1e-20 * np.ones(99)])  # wide spread inside one tensor
    want = [np.linalg.norm(a.astype(dtype).astype(np.float64)) for a in arrays]
    for fn in (norms, tf.function(norms)):  # eager and the graph's functional If
        got = fn([tf.constant(a, dtype) for a in arrays]).numpy()
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    # Only groups, already in input order: every group's values must come back, not just the first group's.
    grouped = [np.full(2, 1.0), np.full(2, 2.0), np.full(3, 1e-20), np.full(3, 4.0)]
    got = norms([tf.constant(a, dtype) for a in grouped]).numpy()
    np.testing.assert_allclose(got, [np.linalg.norm(a) for a in grouped], rtol=2e-6, atol=0)


def test_measure_sigmoid_case_is_informative():
    """Guards the parametrised case above against trivially passing (no saturation, equal gradients)."""
    arch, activation, depth, dtype, opts = MEASURE_CASES[0]
    model = build(arch, activation, depth=depth, dtype=dtype, **opts)
    x, y = batch(16)
    ref = reference(arch, activation, depth, dense_weights(model), x, y)
    sats = [b["act_saturation"] for b in ref["blocks"]]
    assert max(sats) > 0.1 and min(sats) < 0.9
    df = ablations.measure(model, (x, y), loss_fn())
    sat = df.drop_duplicates("depth").set_index("depth")["act_saturation"]
    assert_close([sat[i] for i in range(depth)], sats)
    # Saturation means the derivative threshold is sigmoid's 0.25 * 0.05.
    d0 = ref["derivs"][0]
    assert_close(sat[0], np.mean(d0 < 0.0125))


def test_measure_dead_units_are_counted_exactly():
    depth, width = 2, 8
    model = build("plain_mlp", "relu", depth=depth, width=width)
    lin = model.get_layer("block_000_linear")
    k, b = lin.kernel.numpy(), lin.bias.numpy()
    k[:, :3] = 0.0  # units 0..2: z = -1 for every input -> dead
    b[:3] = -1.0
    k[:, 3] = np.abs(k[:, 3]) + 0.1  # unit 3: positive for every (non-negative) input -> alive everywhere
    b[3] = 0.5
    x, y = batch(32)
    pixel = x.reshape(len(x), -1)[:, 10]
    top2 = np.sort(pixel)[-2:]
    k[:, 4] = 0.0  # unit 4: z = x[10] - t, positive for exactly one example: alive, barely
    k[10, 4] = 1.0
    b[4] = -top2.mean()
    lin.set_weights([k, b])
    ref = reference("plain_mlp", "relu", depth, dense_weights(model), x, y)
    alive_counts = (ref["z"][0] > 0).sum(axis=0)
    assert alive_counts[:3].tolist() == [0, 0, 0] and alive_counts[3] == len(x) and alive_counts[4] == 1
    expected_dead = ref["blocks"][0]["act_dead"]
    assert 3 / width <= expected_dead <= 6 / width
    df = ablations.measure(model, (x, y), loss_fn())
    blocks = df.drop_duplicates("depth").set_index("depth")
    assert blocks.loc[0, "act_dead"] == expected_dead  # exact: a count of units over width
    assert blocks.loc[1, "act_dead"] == ref["blocks"][1]["act_dead"]
    # ReLU saturation = zero derivative (threshold 0.05 * 1): the fraction of non-positive pre-activations.
    assert blocks.loc[0, "act_saturation"] == pytest.approx(np.mean(ref["z"][0] <= 0), abs=1e-7)
    # Dead units have zero weight gradient in their kernel columns.
    row = df[(df.layer == "block_000_linear") & (df.param == "kernel")].iloc[0]
    g = ref["grads"][("block_000_linear", "kernel")]
    assert np.all(g[:, :3] == 0)
    assert_close(row.grad_norm, np.linalg.norm(g))
    for i in range(depth):
        assert_close(blocks.loc[i, "act_grad_norm"], ref["blocks"][i]["act_grad_norm"])


def test_measure_vanishing_gradient_shows_in_act_grad_norm():
    """A deep plain sigmoid net: dL/dz shrinks toward the input (Glorot & Bengio 2010)."""
    depth = 6
    model = build("plain_mlp", "sigmoid", depth=depth, width=8)
    x, y = batch(16)
    df = ablations.measure(model, (x, y), loss_fn())
    g = df.drop_duplicates("depth").set_index("depth")["act_grad_norm"]
    norms = [g[i] for i in range(depth)]
    ref = reference("plain_mlp", "sigmoid", depth, dense_weights(model), x, y)
    assert_close(norms, [b["act_grad_norm"] for b in ref["blocks"]])
    assert norms[0] < norms[-1] / 10


# ------------------------------------------------------------------------------------------ training


class WeightRecorder(keras.callbacks.Callback):
    """Snapshots the net's weights around every train batch (also forces synchronous batch callbacks)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.before, self.after = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(dense_weights(self.net))

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(dense_weights(self.net))


def fit_probed(net, optimizer, x, y, *, every=1, batch_size=16, epochs=1, drain_every=256, record=True,
               extra_callbacks=()):
    steps = len(x) // batch_size
    model = ProbedModel(net, every=every, capacity=16)
    model.compile(optimizer=optimizer, loss=loss_fn())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    drain = DrainCallback(drain_every=drain_every, steps_per_epoch=steps)
    recorder = WeightRecorder(net)
    callbacks = [drain, *([recorder] if record else []), *extra_callbacks]
    model.fit(ds, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks)
    return model, drain, recorder


def replay_sgd(arch, activation, depth, weights, x, y, lr, steps, batch_size=16):
    """Hand-written SGD: per step the reference statistics, then w <- w - lr * g."""
    weights = {k: [a.copy() for a in v] for k, v in weights.items()}
    out = []
    for s in range(steps):
        xb, yb = x[s * batch_size:(s + 1) * batch_size], y[s * batch_size:(s + 1) * batch_size]
        ref = reference(arch, activation, depth, weights, xb, yb)
        out.append(ref)
        for (name, p), g in ref["grads"].items():
            weights[name][0 if p == "kernel" else 1] = weights[name][0 if p == "kernel" else 1] - lr * g
    return out, weights


SGD_CASES = [("plain_mlp", "sigmoid", "float64"), ("resnet_mlp", "tanh", "float32")]


@pytest.mark.parametrize("arch,activation,dtype", SGD_CASES, ids=["-".join(c) for c in SGD_CASES])
def test_probed_sgd_training_matches_replay(arch, activation, dtype):
    depth, lr, steps = 3, 0.1, 3
    net = build(arch, activation, depth=depth, dtype=dtype, bias_init_std=0.0)
    init = dense_weights(net)
    x, y = batch(16 * steps, seed=3)
    model, drain, recorder = fit_probed(net, keras.optimizers.SGD(learning_rate=lr), x, y)
    refs, final = replay_sgd(arch, activation, depth, init, x, y, lr, steps)
    tables = drain.tables(model)
    hist, params, blocks = tables["history"], tables["params"], tables["blocks"]
    n_params = len(net.trainable_variables)

    assert list(hist.columns) == HISTORY_COLUMNS
    assert list(params.columns) == PARAM_COLUMNS
    assert list(blocks.columns) == BLOCK_COLUMNS
    assert hist["step"].tolist() == [0, 1, 2] and hist["epoch"].tolist() == [0, 0, 0]
    assert len(params) == steps * n_params and len(blocks) == steps * depth
    assert drain.diverged_at is None and drain.lost == 0
    assert int(model.optimizer.iterations.numpy()) == steps
    # float32 weights round each update: the actual change equals lr * grad only to ~eps * |w| / |u|.
    update_rtol = RTOL if dtype == "float64" else 2e-3

    for s, ref in enumerate(refs):
        h = hist[hist.step == s].iloc[0]
        assert_close(h["loss"], ref["loss"], what=f"loss step {s}")
        gnorm = math.sqrt(sum(float(np.sum(g ** 2)) for g in ref["grads"].values()))
        assert_close(h["global_grad_norm"], gnorm, what=f"global_grad_norm step {s}")
        assert h["lr"] == pytest.approx(lr, rel=1e-7)

        rows = params[params.step == s]
        assert len(rows) == n_params
        for row in rows.itertuples():
            key = (row.layer, row.param)
            g, w = ref["grads"][key], ref["weights"][key]
            actual = recorder.after[s][row.layer][0 if row.param == "kernel" else 1] - \
                recorder.before[s][row.layer][0 if row.param == "kernel" else 1]
            assert_close(row.grad_norm, np.linalg.norm(g), what=f"grad_norm {key} step {s}")
            assert_close(row.weight_norm, np.linalg.norm(w), what=f"weight_norm {key} step {s}")
            assert_close(row.update_norm, np.linalg.norm(actual), what=f"update_norm vs actual {key} step {s}")
            assert_close(row.update_norm, lr * np.linalg.norm(g), rtol=update_rtol,
                         what=f"update_norm vs lr*grad {key} step {s}")
            if np.linalg.norm(w) > 0:
                assert_close(row.update_ratio, np.linalg.norm(actual) / np.linalg.norm(w))
            else:
                assert s == 0 and row.param == "bias" and math.isnan(row.update_ratio)

        brows = blocks[blocks.step == s].set_index("depth")
        assert brows.index.tolist() == list(range(depth))
        for i in range(depth):
            assert brows.loc[i, "block"] == f"block_{i:03d}"
            for stat, want in ref["blocks"][i].items():
                assert_close(brows.loc[i, stat], want, what=f"{stat} block {i} step {s}")

    # The trained weights are the replay's (relative to the tensor's norm: float32 entries near 0 round).
    for name, (k, b) in dense_weights(net).items():
        for got, want, p in ((k, final[name][0], "kernel"), (b, final[name][1], "bias")):
            assert np.linalg.norm(got - want) <= RTOL * np.linalg.norm(want), f"final {name} {p}"


def test_capture_every_two_records_steps_0_and_2():
    depth, lr, steps = 2, 0.1, 3
    net = build("plain_mlp", "tanh", depth=depth, bias_init_std=0.1)
    init = dense_weights(net)
    x, y = batch(16 * steps, seed=5)
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=lr), x, y, every=2, record=False)
    refs, final = replay_sgd("plain_mlp", "tanh", depth, init, x, y, lr, steps)
    t = drain.tables(model)
    assert t["history"]["step"].tolist() == [0, 2]
    assert sorted(set(t["params"]["step"])) == [0, 2] and sorted(set(t["blocks"]["step"])) == [0, 2]
    assert int(model.optimizer.iterations.numpy()) == 3  # step 1 still trained
    for s in (0, 2):
        h = t["history"][t["history"].step == s].iloc[0]
        assert_close(h["loss"], refs[s]["loss"])
        for row in t["params"][t["params"].step == s].itertuples():
            key = (row.layer, row.param)
            assert_close(row.grad_norm, np.linalg.norm(refs[s]["grads"][key]), what=f"{key} step {s}")
            assert_close(row.update_norm, lr * np.linalg.norm(refs[s]["grads"][key]))
        b = t["blocks"][t["blocks"].step == s].set_index("depth")
        for i in range(depth):
            assert_close(b.loc[i, "act_grad_norm"], refs[s]["blocks"][i]["act_grad_norm"])
    for name, (k, b) in dense_weights(net).items():
        assert_close(k, final[name][0])
        assert_close(b, final[name][1])


@pytest.mark.parametrize("params,updates,activations", [(True, False, False), (False, True, True)])
def test_capture_groups_that_are_off_stay_nan(params, updates, activations):
    depth, lr = 2, 0.1
    net = build("plain_mlp", "tanh", depth=depth, bias_init_std=0.1)
    init = dense_weights(net)
    x, y = batch(16, seed=7)
    model = ProbedModel(net, capacity=4, params=params, updates=updates, activations=activations)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss=loss_fn())
    drain = DrainCallback(drain_every=256, steps_per_epoch=1)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0, callbacks=[drain])
    ref = reference("plain_mlp", "tanh", depth, init, x, y)
    t = drain.tables(model)
    gnorm = math.sqrt(sum(float(np.sum(g ** 2)) for g in ref["grads"].values()))
    assert_close(t["history"]["global_grad_norm"].iloc[0], gnorm)  # every group needs it for the verdicts
    p = t["params"]
    if params:  # gradient norms alone: one pass over the gradients, no copy of the weights
        for row in p.itertuples():
            assert_close(row.grad_norm, np.linalg.norm(ref["grads"][(row.layer, row.param)]))
        assert p[["weight_norm", "update_norm", "update_ratio"]].isna().all().all()
    else:  # `updates` needs `params`
        assert p[["grad_norm", "weight_norm", "update_norm"]].isna().all().all()
        assert "param_norms" not in [i.name for i in model.instruments]
    # No pre-update copy of the weights: off, or plain SGD's update read from the optimizer's own step.
    assert not any("pre_update_weights" in i.needs_for(model.optimizer) for i in model.instruments)
    b = t["blocks"].set_index("depth")
    if activations:
        for i in range(depth):
            assert_close(b.loc[i, "act_grad_norm"], ref["blocks"][i]["act_grad_norm"])
    else:
        assert b.drop(columns=["step", "epoch", "block"]).isna().all().all()


CAPPED = {  # name -> (layer, cap, TensorFlow's derivative of the layer at z)
    "relu6 layer": (lambda n: keras.layers.ReLU(max_value=6.0, name=n), 6.0, lambda z: (z > 0) & (z < 6)),
    "relu6 function": (lambda n: keras.layers.Activation("relu6", name=n), 6.0, lambda z: (z > 0) & (z < 6)),
    # Another cap clips after the ReLU; the clip's gradient passes at the cap itself.
    "cap 5": (lambda n: keras.layers.ReLU(max_value=5.0, name=n), 5.0, lambda z: (z > 0) & (z <= 5)),
}


def _two_blocks(make, seed: int) -> keras.Model:
    """Two blocks of Dense(16) and the activation ``make(name)`` on 64 inputs, then the head."""
    keras.utils.set_random_seed(seed)
    parts = [keras.Input((64,))]
    for i in range(2):
        parts += [keras.layers.Dense(16, name=f"block_{i:03d}_linear"), make(f"block_{i:03d}_act")]
    return keras.Sequential(parts + [keras.layers.Dense(N_OUT, name="head_linear")])


@pytest.mark.parametrize("kind", list(CAPPED))
def test_capped_relu_statistics_follow_tensorflows_derivative_at_the_cap(kind):
    make, cap, deriv = CAPPED[kind]
    model = _two_blocks(make, seed=3)
    lin = model.get_layer("block_000_linear")
    k, b = lin.get_weights()
    k, b = 12.0 * k, b.copy()  # entries below 0 and above the cap
    k[:, 0], b[0] = 0.0, cap  # unit 0 sits on the cap for every example: z == cap exactly
    lin.set_weights([k, b])
    rng = np.random.RandomState(0)
    x, y = rng.uniform(size=(32, 64)).astype(np.float32), rng.randint(0, N_OUT, size=32)
    df = ablations.measure(model, (x, y), loss_fn())
    blocks = df.drop_duplicates("depth").set_index("depth")
    h = x.astype(np.float64)
    for i in range(2):
        kk, bb = (np.asarray(w, np.float64) for w in model.get_layer(f"block_{i:03d}_linear").get_weights())
        z = h @ kk + bb
        a, d = np.clip(z, 0.0, cap), deriv(z)
        one = 1.0 / z.size  # one entry within float32 rounding of a kink
        assert abs(blocks.loc[i, "act_saturation"] - np.mean(~d)) <= one, (kind, i)
        assert abs(blocks.loc[i, "act_dead"] - np.mean(np.all(~d, axis=0))) <= 1.0 / z.shape[1], (kind, i)
        assert_close(blocks.loc[i, "act_mean"], a.mean(), rtol=1e-5)
        assert_close(blocks.loc[i, "act_std"], a.std(), rtol=1e-4)
        if i == 0:  # the unit on the cap tells the two rules apart by 32 entries, so the check above does
            assert np.all(z[:, 0] == cap) and np.sum(z[:, 1:] == cap) == 0
            assert np.sum((z > 0) & (z <= cap)) - np.sum((z > 0) & (z < cap)) == len(z)
        h = a


_SELU = (1.0507009873554804934193349852946, 1.6732632423543772848170429916717)  # scale, alpha (Klambauer 2017)
ELU_SELU_LEAKY = {  # name -> (layer, TensorFlow's derivative at z in NumPy)
    "elu": (lambda n: keras.layers.Activation("elu", name=n), lambda z: np.where(z > 0, 1.0, np.exp(z))),
    "ELU layer": (lambda n: keras.layers.ELU(name=n), lambda z: np.where(z > 0, 1.0, np.exp(z))),
    "selu": (lambda n: keras.layers.Activation("selu", name=n),
             lambda z: np.where(z > 0, _SELU[0], _SELU[0] * _SELU[1] * np.exp(z))),
    "leaky 0.01 (zoo)": (lambda n: make_activation("leaky_relu", n, negative_slope=0.01),
                         lambda z: np.where(z > 0, 1.0, 0.01)),
    "leaky function (0.2)": (lambda n: keras.layers.Activation("leaky_relu", name=n),
                             lambda z: np.where(z > 0, 1.0, 0.2)),
    "leaky 0 (a ReLU)": (lambda n: keras.layers.LeakyReLU(negative_slope=0.0, name=n),
                         lambda z: (z > 0).astype(np.float64)),
}


@pytest.mark.parametrize("kind", list(ELU_SELU_LEAKY))
def test_elu_selu_and_leaky_statistics_match_numpy(kind, monkeypatch):
    """Activation statistics of ELU, SELU and LeakyReLU (recomputed from the tapped input with the layer's own
    gradient; a rule from the output measured no faster, README: Capture overhead) equal NumPy on z, with
    TensorFlow's derivative at the kinks, whichever path the instrument takes."""
    from ablations.instruments import activation

    make, deriv = ELU_SELU_LEAKY[kind]
    model = _two_blocks(make, seed=5)
    lin = model.get_layer("block_000_linear")
    k, b = lin.get_weights()
    lin.set_weights([12.0 * k, b - 1.0])  # pre-activations from about -8 to 6: saturated ELU/SELU entries
    rng = np.random.RandomState(1)
    x, y = rng.uniform(size=(32, 64)).astype(np.float32), rng.randint(0, N_OUT, size=32)
    cols = ["act_mean", "act_std", "act_saturation", "act_dead"]
    got = {}
    for path, per_block, rule in [("per block", True, True), ("stacked", False, True), ("recomputed", False, False)]:
        # (per block and stacked apply where an output rule exists; "recomputed" forces the input path)
        monkeypatch.setattr(activation, "per_block_on_this_host", lambda: per_block)
        monkeypatch.setattr(activation, "PER_BLOCK_MIN_ENTRIES", 0)
        if not rule:
            monkeypatch.setattr(activation, "output_slope", lambda layer: None)
        got[path] = ablations.measure(model, (x, y), loss_fn()).drop_duplicates("depth").set_index("depth")
    h = x.astype(np.float64)
    for i in range(2):
        layer = model.get_layer(f"block_{i:03d}_act")
        kk, bb = (np.asarray(w, np.float64) for w in model.get_layer(f"block_{i:03d}_linear").get_weights())
        z = h @ kk + bb
        a, d = np.asarray(layer(z.astype(np.float32)), np.float64), deriv(z)
        sat = d < SATURATION_FRACTION * max_derivative(layer)
        for path, blocks in got.items():
            what = f"{kind}, block {i}, {path}"
            assert abs(blocks.loc[i, "act_saturation"] - np.mean(sat)) <= 1.0 / z.size, what  # a kink's rounding
            assert blocks.loc[i, "act_dead"] == pytest.approx(np.mean(np.all(d == 0, axis=0)), abs=1e-9), what
            assert_close(blocks.loc[i, "act_mean"], a.mean(), rtol=1e-5, what=what)
            assert_close(blocks.loc[i, "act_std"], a.std(), rtol=1e-4, what=what)
        if i == 0 and kind in ("elu", "selu"):
            assert 0.1 < np.mean(sat) < 0.9  # both sides of the threshold occur: the check above can fail
        if i == 0 and kind == "leaky 0 (a ReLU)":
            assert np.mean(np.all(d == 0, axis=0)) > 0  # dead units occur
        h = a


@pytest.mark.parametrize("arch, act", [("plain_mlp", "relu"), ("plain_mlp", "sigmoid"), ("resnet_cnn", "relu"),
                                       ("highway_cnn", "tanh")])
def test_activation_statistics_are_the_same_block_by_block_or_stacked(arch, act, monkeypatch):
    # A CPU host reads wide blocks one by one, an accelerator (and narrow nets) on the stacked outputs: both must
    # give one answer.
    from ablations.instruments import activation

    net = build(arch, act, depth=3, dtype="float32", bias_init_std=0.2)
    x, y = batch(16, seed=4)
    cols = ["act_mean", "act_std", "act_saturation", "act_dead"]
    got = {}
    for per_block in (True, False):
        monkeypatch.setattr(activation, "per_block_on_this_host", lambda: per_block)
        monkeypatch.setattr(activation, "PER_BLOCK_MIN_ENTRIES", 0)  # these nets are narrow: per block anyway
        df = ablations.measure(net, (x, y), loss_fn()).drop_duplicates("depth")
        got[per_block] = df[df["depth"] >= 0][cols].to_numpy()
    assert np.isfinite(got[True]).all() and got[True].shape[0] >= 3
    np.testing.assert_allclose(got[True], got[False], rtol=1e-6, atol=1e-7)


def test_prelu_statistics_are_those_of_the_forward_pass_not_the_updated_slopes():
    # PReLU's slope is a weight: its derivative is recomputed from the block input, which must use the slope
    # the forward pass used, not the one the optimizer has just changed (a large learning rate moves it).
    net = build("plain_mlp", "prelu", depth=2, dtype="float32", bias_init_std=0.1)
    x, y = batch(32, seed=8)
    before = ablations.measure(net, (x, y), loss_fn(), training=True).drop_duplicates("depth").set_index("depth")
    alpha0 = [np.array(l.alpha) for l in net.layers if isinstance(l, keras.layers.PReLU)]
    model = ProbedModel(net, capacity=4)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=5.0), loss=loss_fn())
    drain = DrainCallback(drain_every=256, steps_per_epoch=1)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), verbose=0, callbacks=[drain])
    alpha1 = [np.array(l.alpha) for l in net.layers if isinstance(l, keras.layers.PReLU)]
    assert max(np.abs(a - b).max() for a, b in zip(alpha0, alpha1)) > 1e-2  # the slopes did move
    b = drain.tables(model)["blocks"].set_index("depth")
    for i in range(2):
        for stat in ("act_mean", "act_std", "act_saturation", "act_dead"):
            assert_close(b.loc[i, stat], before.loc[i, stat], rtol=1e-5, what=f"{stat} block {i}")


def test_rezero_alpha_is_recorded_before_its_update():
    net = zoo.build("rezero_mlp", input_shape=INPUT_SHAPE, num_outputs=N_OUT, depth=3, width=8, alpha_init=0.3)
    x, y = batch(16, seed=9)
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.5), x, y, record=False)
    t = drain.tables(model)
    b = t["blocks"].set_index("depth")
    assert b["alpha"].tolist() == pytest.approx([0.3] * 3, rel=1e-6)  # step 0: the initial value
    assert b["active"].isna().all() and b["gate_mean"].isna().all()
    alphas = {l.name: float(np.asarray(l.alpha)) for l in net.layers if l.name.endswith("_rezero")}
    p = t["params"].set_index("layer")
    for name, final in alphas.items():
        assert abs(final - 0.3) > 1e-4  # it trained
        assert_close(p.loc[name, "update_norm"], abs(final - 0.3), rtol=1e-4, what=name)


def test_a_transformer_layers_two_rezero_alphas_give_the_larger_one_and_off_only_when_both_are_0():
    """A ReZero encoder layer has one alpha per sub-layer: `alpha` is the one of larger |alpha| (signed)."""
    from ablations.instruments.block_scalars import drop_inactive

    net = zoo.build("transformer", input_shape=(6, 4), num_outputs=N_OUT, depth=2, d_model=8, heads=2,
                    ffn_width=16, norm_position="none", residual="rezero")
    rz = {l.name: l for l in net.layers if isinstance(l, zoo.layers.ReZeroAlpha)}
    values = {0: (0.2, -0.5), 1: (0.0, 0.0)}  # block 1 is the identity: both alphas 0
    for i, pair in values.items():
        for sub, value in zip((1, 2), pair):
            rz[f"block_{i:03d}_rezero{sub}"].alpha.assign(value)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(16, 6, 4)).astype("float32"), rng.integers(0, N_OUT, 16)
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.0), x, y, record=False)
    t = drain.tables(model)
    b = t["blocks"].set_index("depth")
    assert b.loc[0, "alpha"] == pytest.approx(-0.5) and b.loc[1, "alpha"] == 0.0
    kept = drop_inactive(t["params"], t["blocks"])
    assert set(kept.loc[kept.role == "block", "depth"]) == {0}  # only the all-zero block is switched off


class ActiveRecorder(keras.callbacks.Callback):
    """Reads every stochastic-depth layer's `active` weight after each batch (the probe reads it in-graph)."""

    def __init__(self, net):
        super().__init__()
        self.layers = [l for l in net.layers if isinstance(l, zoo.layers.StochasticDepth)]
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append([float(np.asarray(l.active)) for l in self.layers])


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_stochastic_depth_active_fraction_matches_the_layers(mode):
    import zoo.layers  # noqa: F401 - StochasticDepth

    depth, steps = 4, 12
    net = zoo.build("stochastic_depth_mlp", input_shape=INPUT_SHAPE, num_outputs=N_OUT, depth=depth, width=8,
                    survival_prob=0.5, mode=mode)
    x, y = batch(16 * steps, seed=10)
    seen = ActiveRecorder(net)
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.01), x, y, record=False,
                                 extra_callbacks=[seen])
    b = drain.tables(model)["blocks"]
    got = b.pivot(index="step", columns="depth", values="active").to_numpy()
    want = np.array(seen.rows)
    assert got.shape == (steps, depth)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    if mode == "batch":
        assert set(np.unique(got)) <= {0.0, 1.0}
    else:
        assert np.allclose(got * 16, np.round(got * 16))  # a count of the 16 examples
    assert 0 < got[:, -1].mean() < 1  # the last block (p = 0.5) is sometimes off
    assert b["alpha"].isna().all()


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_gradient_histograms_match_numpy_on_the_reference_gradients(jit, no_op_determinism):
    import warnings

    from ablations.instruments.grad_hist import HIST_BINS, HIST_EXP_LO, HIST_RANGE

    depth = 3
    net = build("plain_mlp", "relu", depth=depth, width=8, bias_init_std=0.1)
    lin = net.get_layer("block_001_linear")
    k, b = lin.kernel.numpy(), lin.bias.numpy()
    k[:, :3], b[:3] = 0.0, -1.0  # three dead units: their kernel columns in block 2 get exactly zero gradient
    lin.kernel.assign(k)
    lin.bias.assign(b)
    init = dense_weights(net)
    x, y = batch(16, seed=11)
    model = ProbedModel(net, capacity=4, histograms=True)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=loss_fn(), jit_compile=jit)
    drain = DrainCallback(drain_every=256, steps_per_epoch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Model doesn't support jit_compile" must not happen
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0, shuffle=False, callbacks=[drain])
    h = drain.tables(model)["grad_hist"]
    ref = reference("plain_mlp", "relu", depth, init, x, y)
    assert sorted(set(h["depth"])) == list(range(depth))
    zeros_seen = 0
    for d in range(depth):
        g = np.abs(ref["grads"][(f"block_{d:03d}_linear", "kernel")]).ravel()
        rows = h[h.depth == d].set_index("bin")
        exponent = np.frexp(g[g > 0])[1] - 1  # |g| in [2^e, 2^(e+1))
        want = np.bincount(np.clip(exponent - HIST_EXP_LO, 0, HIST_BINS - 1), minlength=HIST_BINS)
        np.testing.assert_array_equal(rows.loc[range(HIST_BINS), "count"].to_numpy(), want, err_msg=f"block {d}")
        assert rows.loc[-1, "count"] == np.sum(g == 0)
        assert rows["count"].sum() == g.size and rows["fraction"].sum() == pytest.approx(1.0)
        zeros_seen += int(np.sum(g == 0))
    assert zeros_seen >= 3 * 8  # the dead units' columns (8 inputs each) are counted as zeros, not as 1e-20
    assert h["log10_lo"].min() == pytest.approx(HIST_RANGE[0]) and h["log10_hi"].max() == pytest.approx(HIST_RANGE[1])
    row = h[(h.depth == 0) & (h.bin == 67)].iloc[0]  # bin 67: [2^0, 2^1)
    assert row.log10_lo == pytest.approx(0.0, abs=1e-12) and row.log10_hi == pytest.approx(np.log10(2.0))


def test_adam_update_norm_is_the_actual_weight_change():
    depth, lr, steps = 2, 0.01, 3
    net = build("plain_mlp", "sigmoid", depth=depth, bias_init_std=0.1)
    init = dense_weights(net)
    x, y = batch(16 * steps, seed=7)
    model, drain, recorder = fit_probed(net, keras.optimizers.Adam(learning_rate=lr), x, y)
    params = drain.tables(model)["params"]
    assert sorted(set(params["step"])) == [0, 1, 2]
    ref0 = reference("plain_mlp", "sigmoid", depth, init, x[:16], y[:16])
    eps, beta_2 = 1e-7, 0.999
    different = 0
    for row in params.itertuples():
        i = 0 if row.param == "kernel" else 1
        actual = recorder.after[row.step][row.layer][i] - recorder.before[row.step][row.layer][i]
        assert_close(row.update_norm, np.linalg.norm(actual), what=f"{row.layer}/{row.param} step {row.step}")
        assert_close(row.weight_norm, np.linalg.norm(recorder.before[row.step][row.layer][i]))
        if abs(row.update_norm - lr * row.grad_norm) > 0.1 * row.update_norm:
            different += 1
        if row.step == 0:
            # Adam's first step in closed form: lr * g * sqrt(1 - b2) / (sqrt(1 - b2) |g| + eps).
            g = ref0["grads"][(row.layer, row.param)]
            c = math.sqrt(1 - beta_2)
            assert_close(row.grad_norm, np.linalg.norm(g))
            assert_close(row.update_norm, np.linalg.norm(lr * g * c / (c * np.abs(g) + eps)), rtol=1e-4)
    assert different == len(params)  # nowhere is Adam's update lr * grad


# ------------------------------------------------------------------------------------------ depth


class AllWeightsRecorder(keras.callbacks.Callback):
    """Every layer's weights (ReZero alphas included) as float64 copies, before each train batch."""

    def __init__(self, net):
        super().__init__()
        self.net, self.before = net, []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append({layer.name: [np.array(v, np.float64) for v in layer.weights]
                            for layer in self.net.layers if layer.weights})


def rezero_dz_norms(weights, depth, x, y):
    """||dL/dz|| of every block of a ReLU ``rezero_mlp`` (h <- h + alpha relu(W h + b)), float64, plain ops."""
    w = {name: [tf.constant(a) for a in arrays] for name, arrays in weights.items()}
    h = tf.constant(np.asarray(x, np.float64).reshape(len(x), -1))
    zs = []
    with tf.GradientTape() as tape:
        h = h @ w["stem_linear"][0] + w["stem_linear"][1]
        for i in range(depth):
            k, b = w[zoo.block_name(i, "linear", depth)]
            z = h @ k + b
            tape.watch(z)
            zs.append(z)
            h = h + w[zoo.block_name(i, "rezero", depth)][0] * tf.maximum(z, 0.0)
        logits = h @ w["head_linear"][0] + w["head_linear"][1]
        log_p = tf.nn.log_softmax(logits)
        loss = -tf.reduce_mean(tf.gather(log_p, np.asarray(y), axis=1, batch_dims=1))
    return np.array([np.linalg.norm(g) for g in tape.gradient(loss, zs)])


@pytest.mark.parametrize("depth", [48, pytest.param(1000, marks=pytest.mark.slow)])
def test_deep_rezero_captures_every_block_from_one_traced_step(depth):
    """The issue's depth-1000 ReZero MLP (slow; 48 in the default suite): every block on every step, from one
    traced graph (no Python per block or per step), dL/dz matching a hand-written float64 tape."""
    steps, bs = 6, 16
    net = build("rezero_mlp", "relu", depth=depth, width=16)
    model = ProbedModel(net, capacity=8)
    traces = []
    traced_step = model._step
    object.__setattr__(model, "_step", lambda *a, **k: (traces.append(1), traced_step(*a, **k))[1])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss=loss_fn())
    x, y = batch(steps * bs, seed=5)
    drain = DrainCallback(drain_every=4, steps_per_epoch=steps)  # drains mid-run and at the end
    recorder = AllWeightsRecorder(net)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(bs), verbose=0, shuffle=False,
              callbacks=[drain, recorder])
    assert len(traces) == 1 and drain.lost == 0 and drain.diverged_at is None
    blocks = drain.tables(model)["blocks"]
    assert blocks.groupby("step").size().to_dict() == {s: depth for s in range(steps)}
    first = blocks[blocks.step == 0]
    assert (first.alpha == 0).all() and (first.act_grad_norm == 0).all()  # alpha = 0: identity at init
    for s in (1, steps - 1):
        got = blocks[blocks.step == s].sort_values("depth")
        alphas = [recorder.before[s][zoo.block_name(i, "rezero", depth)][0] for i in range(depth)]
        assert_close(got.alpha, alphas, rtol=1e-6, what=f"alpha, step {s}")
        want = rezero_dz_norms(recorder.before[s], depth, x[s * bs:(s + 1) * bs], y[s * bs:(s + 1) * bs])
        assert want.min() > 0
        assert_close(got.act_grad_norm, want, what=f"dL/dz, step {s}")


# ------------------------------------------------------------------------------------------ divergence
#
# These use the identity ("linear") activation on purpose: inside a tf.function on CPU, TensorFlow fuses
# MatMul+BiasAdd+Relu into one kernel that maps NaN pre-activations to 0, so a ReLU net fed an inf (or with
# NaN weights) can keep a finite loss while its gradients are NaN. The probe flags a non-finite *loss*.


def _inf_batches(n_batches, bad_batch, batch_size=16):
    x, y = batch(batch_size * n_batches, seed=11)
    x[bad_batch * batch_size + 3, 2, 5, 0] = np.inf
    return x, y


def test_non_finite_loss_stops_training_at_the_first_bad_step():
    net = build("plain_mlp", "linear", depth=2, dtype="float32")
    x, y = _inf_batches(6, bad_batch=2)
    # drain_every=1 and a synchronous callback: the flag is read right after the bad step.
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.1), x, y, drain_every=1)
    assert drain.diverged_at == 2
    assert model.stop_training is True
    assert int(model.optimizer.iterations.numpy()) == 3
    h = drain.tables(model)["history"]
    assert h["step"].tolist() == [0, 1, 2]
    assert np.isfinite(h["loss"].iloc[:2]).all() and not np.isfinite(h["loss"].iloc[2])


def test_divergence_from_huge_learning_rate_is_caught_at_the_first_non_finite_loss():
    net = build("plain_mlp", "linear", depth=3, width=16, dtype="float32")
    x, y = batch(16, seed=2)
    x, y = np.concatenate([x] * 10), np.concatenate([y] * 10)
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=1e6), x, y, epochs=1, drain_every=256)
    assert drain.diverged_at is not None
    assert model.stop_training is True
    h = drain.tables(model)["history"]
    losses = h["loss"].to_numpy()
    assert h["step"].iloc[-1] == drain.diverged_at
    assert not np.isfinite(losses[-1]) and np.isfinite(losses[:-1]).all()
    assert h["step"].tolist() == list(range(drain.diverged_at + 1))


@pytest.mark.parametrize("spe", [1, 4])
def test_the_first_non_finite_step_is_exact_on_steps_that_capture_nothing(spe):
    # every=8: steps 1-7 and 9-11 run the plain step; the inf enters at step 5, and every step after it is bad
    # too (NaN weights), so the first bad step must survive the later ones (the flag keeps the minimum).
    net = build("plain_mlp", "linear", depth=2, dtype="float32")
    x, y = _inf_batches(12, bad_batch=5)
    model = ProbedModel(net, every=8, capacity=16)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=loss_fn(), steps_per_execution=spe)
    assert model.ring.read()["first_nonfinite"] == -1
    drain = DrainCallback(drain_every=256, steps_per_epoch=12)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0, shuffle=False,
              callbacks=[drain])
    assert int(model.optimizer.iterations.numpy()) == 12  # drained only at the end: all 12 steps ran
    assert drain.diverged_at == 5 and model.stop_training is True
    assert drain.tables(model)["history"]["step"].tolist() == [0]  # step 8 came after the blow-up


def test_rows_after_divergence_are_dropped():
    depth = 2
    net = build("plain_mlp", "linear", depth=depth, dtype="float32")
    x, y = _inf_batches(5, bad_batch=2)
    # Drained only at the end of the epoch: all 5 steps are captured, then the NaN flag is read.
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.1), x, y, drain_every=256,
                                 record=False)
    assert int(model.optimizer.iterations.numpy()) == 5
    assert np.concatenate(drain.steps[model.every]).tolist() == [0, 1, 2, 3, 4]
    assert drain.diverged_at == 2 and model.stop_training is True
    t = drain.tables(model)
    assert t["history"]["step"].tolist() == [0, 1, 2]
    assert sorted(set(t["params"]["step"])) == [0, 1, 2]
    assert sorted(set(t["blocks"]["step"])) == [0, 1, 2]
    assert len(t["params"]) == 3 * len(net.trainable_variables) and len(t["blocks"]) == 3 * depth
    assert list(t["params"].columns) == PARAM_COLUMNS and list(t["blocks"].columns) == BLOCK_COLUMNS


def test_stop_after_divergence_in_an_earlier_epoch():
    """Asynchronous batch callbacks: the flag is read at the epoch end at the latest."""
    net = build("plain_mlp", "linear", depth=2, dtype="float32")
    x, y = _inf_batches(2, bad_batch=1)  # every epoch's second batch holds an inf
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.1), x, y, epochs=5, drain_every=256,
                                 record=False)
    assert drain.diverged_at == 1
    assert int(model.optimizer.iterations.numpy()) == 2  # stopped after epoch 0 of 5
    assert drain.tables(model)["history"]["step"].tolist() == [0, 1]


# ------------------------------------------------------------------------------------------ helpers


def test_ring_capacity_holds_a_drain_window():
    assert ring_capacity(every=1, drain_every=256, steps_per_epoch=22, steps_per_execution=4) == 2 * 26 + 4
    assert ring_capacity(every=4, drain_every=8, steps_per_epoch=100, steps_per_execution=1) == 2 * 3 + 4


def test_an_auto_drain_interval_keeps_the_ring_within_its_share_of_the_weights():
    from ablations.probe.recorder import AUTO_DRAIN, RING_SHARE, auto_drain_every, size_ring

    assert auto_drain_every(1000, 10**9, every=1, steps_per_execution=1) == AUTO_DRAIN[1]  # a big net: the most
    assert auto_drain_every(1000, 10**3, every=1, steps_per_execution=1) == AUTO_DRAIN[0]  # a tiny one: the fewest
    for every, spe in ((1, 1), (4, 1), (2, 4)):
        d = auto_drain_every(1200, 1_080_000, every, spe)  # ResNet-20's weights, about its bytes per capture
        assert AUTO_DRAIN[0] < d < AUTO_DRAIN[1]
        assert ring_capacity(every, d, 10**6, spe) * 1200 <= RING_SHARE * 1_080_000 < \
            ring_capacity(every, d + every, 10**6, spe) * 1200  # the largest interval within the share
    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=20, width=256)
    model = ProbedModel(net, capacity=1)
    d = size_ring(model, "auto", 10**6, 1)
    weights = sum(int(np.prod(v.shape)) * 4 for v in net.trainable_weights)
    ring = sum(int(np.prod(v.shape)) * 4 for v in model.ring.values.values()) + \
        sum(int(v.shape[0]) * 8 for v in model.ring.steps.values())
    assert model.ring.capacity == ring_capacity(1, d, 10**6, 1) and ring <= RING_SHARE * weights
    assert size_ring(model, 7, 10**6, 1) == 7 and model.ring.capacity == ring_capacity(1, 7, 10**6, 1)


def test_max_derivative_of_activation_layers():
    from zoo.activations import make_activation

    assert max_derivative(make_activation("sigmoid", "s", "float64")) == pytest.approx(0.25)
    assert max_derivative(make_activation("tanh", "t", "float64")) == pytest.approx(1.0)
    assert max_derivative(make_activation("relu", "r")) == pytest.approx(1.0)
    assert max_derivative(
        make_activation("leaky_relu", "l", negative_slope=0.3)) == pytest.approx(1.0)


def test_blocks_off_by_design_skip_the_underflow_rescue():
    """A dropped stochastic-depth branch and a ReZero block at alpha = 0 have exact-zero gradients by design:
    they are marked so their zeros do not send every tensor through the (slower) rescaled norms."""
    from ablations.instruments.base import StepContext
    from ablations.instruments.block_scalars import off_mask as off_blocks
    from ablations.probe import make_spec

    def param_skip(spec, off):
        return StepContext(spec=spec, off=off).param_skip()

    net = zoo.build("rezero_mlp", input_shape=INPUT_SHAPE, num_outputs=N_OUT, depth=3, width=8)
    spec = make_spec(net)
    off = off_blocks(spec).numpy()
    assert off.tolist() == [True, True, True]  # alpha = 0 at init
    skip = param_skip(spec, off_blocks(spec)).numpy()
    rows = spec.param_block_rows()
    assert skip.tolist() == (rows >= 0).tolist() and not skip[rows < 0].any()  # stem and head never skipped
    net.get_layer("block_001_rezero").alpha.assign(0.5)
    assert off_blocks(spec).numpy().tolist() == [True, False, True]

    sd = zoo.build("stochastic_depth_mlp", input_shape=INPUT_SHAPE, num_outputs=N_OUT, depth=4, width=8,
                   survival_prob=0.5)
    sd_spec = make_spec(sd)
    layers = [l for l in sd.layers if isinstance(l, zoo.layers.StochasticDepth)]
    for seed in range(6):
        sd(batch(4, seed=seed)[0], training=True)  # the layers write `active`
        want = [float(np.asarray(l.active)) == 0.0 for l in layers]
        assert off_blocks(sd_spec).numpy().tolist() == want

    tensors = [tf.zeros([3]), tf.constant(1e-30 * np.ones(4), tf.float32), tf.ones([2])]
    for skip in (None, tf.constant([True, False, False])):
        got = norms(tensors, skip).numpy()
        np.testing.assert_allclose(got, [0.0, 2e-30, np.sqrt(2.0)], rtol=1e-6)  # the tiny one still rescued


def test_a_non_finite_gradient_under_a_finite_loss_marks_divergence_at_that_step():
    """t + sqrt(0 * |t|) = t, but d sqrt(u)/du at u = 0 is inf, times 0: a finite loss with NaN gradients."""
    inputs = keras.Input(INPUT_SHAPE)
    h = keras.layers.Dense(N_OUT, name="head_linear")(keras.layers.Flatten(name="stem_flatten")(inputs))
    out = keras.layers.Lambda(lambda t: t + keras.ops.sqrt(keras.ops.abs(t) * 0.0), name="head_trap")(h)
    net = keras.Model(inputs, out)
    x, y = batch(48, seed=12)
    model, drain, _ = fit_probed(net, keras.optimizers.SGD(learning_rate=0.1), x, y, drain_every=1, record=False)
    assert drain.diverged_at == 0 and model.stop_training is True
    h = drain.tables(model)["history"]
    assert h["step"].tolist() == [0] and np.isfinite(h["loss"].iloc[0])
    assert not np.isfinite(h["global_grad_norm"].iloc[0])
