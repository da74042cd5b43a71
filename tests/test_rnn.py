"""Recurrent zoo models, their initializers, gradients through time and gate statistics.

The through-time gradient is checked against an explicitly unrolled Python loop over the time steps whose
every h_t is differentiated by its own tf.GradientTape (float64, relative error < 1e-5). The at-init effects
(forget bias 1 vs 0, spectral radius 0.5 vs 1.0) are Pascanu et al. 2013 and Gers et al. 2000 in miniature.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import zoo
from ablations.instruments._rnn_views import gate_statistics, gate_values, time_grads, time_probe_view

MSE = keras.losses.MeanSquaredError()


def time_grad_norms(probe, x, y, loss_fn, training=False):
    """(loss, [layers, T] batch-global ||dL/dh_t||) through the view."""
    loss, grads = time_grads(probe, x, y, loss_fn, training)
    return loss, tf.stack([tf.sqrt(tf.reduce_sum(tf.square(tf.cast(g, tf.float32)), axis=[0, 2])) for g in grads])
ARCHS = ("simple_rnn", "lstm", "gru")


def _build(arch: str, shape=(12, 3), n_out=2, seed=0, **kw) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return zoo.build(arch, input_shape=shape, num_outputs=n_out, **kw)


def _n_states(cell) -> int:
    return len(cell.state_size) if isinstance(cell.state_size, (list, tuple)) else 1


def unrolled_reference(model: keras.Model, x, y, loss_fn, sequence_output: bool):
    """dL/dh_t for every recurrent layer by a Python loop over t (cells applied step by step)."""
    rec = [l for l in model.layers if l.name.endswith("_rnn")]
    batch = x.shape[0]
    with tf.GradientTape(persistent=True) as tape:
        seq, per_layer = tf.constant(x), []
        for layer in rec:
            cell = layer.cell
            states = [tf.zeros([batch, cell.units], seq.dtype) for _ in range(_n_states(cell))]
            hs = []
            for t in range(seq.shape[1]):
                h, states = cell(seq[:, t], states)
                states = list(states) if isinstance(states, (list, tuple)) else [states]
                hs.append(h)
            per_layer.append(hs)
            seq = tf.stack(hs, axis=1)
        feat = seq if sequence_output else seq[:, -1]
        loss = tf.reduce_mean(loss_fn(y, model.get_layer("head_linear")(feat)))
    grads = [tf.stack(tape.gradient(loss, hs), axis=1).numpy() for hs in per_layer]
    return float(loss), grads


# ------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw,shape,n_out,out_shape", [
    ({}, (10, 3), 2, (4, 2)),
    ({"depth": 2, "output": "sequence"}, (10, 3), 5, (4, 10, 5)),
    ({"output": "sequence"}, (10,), 6, (4, 10, 6)),  # integer tokens, one-hot stem
    ({"bidirectional": True}, (10, 3), 2, (4, 2)),
])
def test_shapes_and_every_variable_gets_a_gradient(arch, kw, shape, n_out, out_shape):
    m = _build(arch, shape, n_out, units=8, **kw)
    rng = np.random.default_rng(0)
    x = rng.integers(0, n_out, (4, *shape)) if len(shape) == 1 else rng.normal(size=(4, *shape)).astype("float32")
    with tf.GradientTape() as tape:
        out = m(x)
        loss = tf.reduce_mean(tf.square(out))
    assert tuple(out.shape) == out_shape
    grads = tape.gradient(loss, m.trainable_variables)
    assert all(g is not None and float(tf.norm(g)) > 0 for g in grads)
    names = [b.prefix for b in zoo.blocks(m)]
    assert names == [zoo.block_name(i, "rnn", kw.get("depth", 1))[: -len("_rnn")] for i in range(kw.get("depth", 1))]


@pytest.mark.parametrize("arch,gates,biases", [("simple_rnn", 1, 1), ("lstm", 4, 1), ("gru", 3, 2)])
def test_parameter_count_matches_closed_form(arch, gates, biases):
    # Keras' GRU (reset_after) keeps separate input and recurrent biases: 2 bias vectors per gate.
    n_in, units, n_out = 3, 7, 2
    m = _build(arch, (5, n_in), n_out, units=units, depth=2)
    per_layer = lambda fan_in: gates * units * (fan_in + units + biases)  # noqa: E731
    assert m.count_params() == per_layer(n_in) + per_layer(units) + units * n_out + n_out


def test_recurrent_initializers():
    units = 16
    # Spectral radius: every gate block's largest |eigenvalue| equals the target.
    for arch, gates in (("simple_rnn", 1), ("lstm", 4), ("gru", 3)):
        u = _build(arch, (5, 2), units=units, spectral_radius=0.7).get_layer("block_000_rnn").cell.recurrent_kernel
        u = np.asarray(u)
        assert u.shape == (units, gates * units)
        for g in range(gates):
            rho = np.max(np.abs(np.linalg.eigvals(u[:, g * units:(g + 1) * units])))
            assert rho == pytest.approx(0.7, rel=1e-5)
    # Identity (IRNN) scaled by the gain; orthogonal with gain: U^T U = gain^2 I.
    u = np.asarray(_build("simple_rnn", (5, 2), units=units, recurrent_initializer="identity", recurrent_gain=0.9,
                          activation="relu").get_layer("block_000_rnn").cell.recurrent_kernel)
    np.testing.assert_allclose(u, 0.9 * np.eye(units), atol=1e-7)
    u = np.asarray(_build("simple_rnn", (5, 2), units=units, recurrent_gain=1.5)
                   .get_layer("block_000_rnn").cell.recurrent_kernel)
    np.testing.assert_allclose(u.T @ u, 2.25 * np.eye(units), atol=1e-5)


@pytest.mark.parametrize("forget_bias,expected", [("unit", 1.0), (1.0, 1.0), (0.0, 0.0), (2.5, 2.5)])
def test_lstm_forget_bias(forget_bias, expected):
    units = 6
    b = np.asarray(_build("lstm", (5, 2), units=units, forget_bias=forget_bias).get_layer("block_000_rnn").cell.bias)
    want = np.zeros(4 * units)
    want[units:2 * units] = expected  # Keras gate order: i, f, c, o
    np.testing.assert_array_equal(b, want)


@pytest.mark.parametrize("kw,match", [
    ({"arch": "lstm", "forget_bias": "ones"}, "forget_bias"),
    ({"arch": "gru", "output": "first"}, "output must be one of last, sequence"),
    ({"arch": "simple_rnn", "activation": "leaky_relu"}, "activation must be one of"),
    ({"arch": "simple_rnn", "recurrent_initializer": "eye"}, "recurrent_initializer must be one of"),
])
def test_bad_options_name_the_allowed_values(kw, match):
    arch = kw.pop("arch")
    with pytest.raises(ValueError, match=match):
        zoo.build(arch, input_shape=(5, 2), num_outputs=1, **kw)
    with pytest.raises(ValueError, match="data.transform"):
        zoo.build("lstm", input_shape=(8, 8, 1), num_outputs=10)


def test_keras_round_trip(tmp_path):
    m = _build("lstm", (6, 2), 3, units=5, depth=2, forget_bias=0.0, spectral_radius=0.9)
    path = os.path.join(tmp_path, "m.keras")
    m.save(path)
    x = np.random.default_rng(1).normal(size=(3, 6, 2)).astype("float32")
    np.testing.assert_array_equal(keras.saving.load_model(path)(x), m(x))


# ---------------------------------------------------------------------------------- through time


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("output", ["last", "sequence"])
def test_through_time_gradient_matches_unrolled_loop(arch, output):
    T, n_out = 9, 2
    m = _build(arch, (T, 3), n_out, units=5, depth=2, output=output, dtype="float64")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, T, 3))
    y = rng.normal(size=(4, T, n_out) if output == "sequence" else (4, n_out))
    probe = time_probe_view(m)
    assert probe.names == ["block_000_rnn", "block_001_rnn"] and probe.lengths == [T, T]
    np.testing.assert_array_equal(probe.view([tf.constant(x), *probe.zeros(4, "float64")]), m(x))
    loss, grads = time_grads(probe, x, y, MSE)
    ref_loss, ref = unrolled_reference(m, x, y, MSE, output == "sequence")
    assert float(loss) == pytest.approx(ref_loss, rel=1e-12)
    for g, r in zip(grads, ref):
        assert np.linalg.norm(r[:, 0]) > 0  # the total derivative reaches t = 0 even when only h_T is read out
        assert np.linalg.norm(g.numpy() - r) / np.linalg.norm(r) < 1e-5
    # The compiled norms are the batch-global norms of those gradients.
    _, norms = tf.function(lambda a, b: time_grad_norms(probe, a, b, MSE))(tf.constant(x), tf.constant(y))
    want = np.stack([np.sqrt((r ** 2).sum(axis=(0, 2))) for r in ref])
    np.testing.assert_allclose(norms.numpy(), want, rtol=1e-5)


def test_probe_view_shares_the_models_weights():
    m = _build("gru", (6, 2), 1, units=4)
    probe = time_probe_view(m)
    assert {id(v) for v in probe.view.trainable_variables} == {id(v) for v in m.trainable_variables}
    cell = m.get_layer("block_000_rnn").cell
    cell.recurrent_kernel.assign(cell.recurrent_kernel * 0.5)  # a change to the model is seen by the view
    x = np.random.default_rng(3).normal(size=(2, 6, 2)).astype("float32")
    np.testing.assert_allclose(probe.view([tf.constant(x), *probe.zeros(2)]), m(x), rtol=1e-6)
    with pytest.raises(ValueError, match="bidirectional: false"):
        time_probe_view(_build("lstm", (6, 2), 1, units=4, bidirectional=True))


def _lag_ratio(arch: str, T: int = 50, **kw) -> float:
    """Mean over 2 seeds of ||dL/dh_0|| / ||dL/dh_{T-1}|| at init, on an adding-problem batch."""
    from ablations.data.adding import generate

    x, y = generate(T, 64, seed=5)
    ratios = []
    for seed in range(2):
        probe = time_probe_view(_build(arch, (T, 2), 1, seed=seed, units=32, **kw))
        _, norms = time_grad_norms(probe, x, y, MSE)
        ratios.append(float(norms[0, 0] / norms[0, -1]))
    return float(np.mean(ratios))


def test_forget_bias_one_keeps_more_gradient_at_long_lags_than_zero():
    # Measured here: ~1e-2 with bias 1 vs ~1e-7 with bias 0 at lag 49 (forget gate ~0.73 vs ~0.5 per step).
    one, zero = _lag_ratio("lstm", forget_bias=1.0), _lag_ratio("lstm", forget_bias=0.0)
    assert one > 1e3 * zero


def test_spectral_radius_half_vanishes_faster_than_one():
    # Measured here: ~5e-16 at radius 0.5 (0.5^49 ~ 2e-15 times tanh' <= 1) vs ~5e-3 at radius 1.0.
    half, one = _lag_ratio("simple_rnn", spectral_radius=0.5), _lag_ratio("simple_rnn", spectral_radius=1.0)
    assert half < 1e-12 and one > 1e6 * half


# ---------------------------------------------------------------------------------- gate statistics


def _np_gates(model: keras.Model, x: np.ndarray) -> dict:
    """NumPy reference: LSTM (i, f, o) / GRU (z, r) activations of every step of the first layer."""
    cell = model.get_layer("block_000_rnn").cell
    k, u = np.asarray(cell.kernel, np.float64), np.asarray(cell.recurrent_kernel, np.float64)
    b, n = np.asarray(cell.bias, np.float64), cell.units
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h, c, out = np.zeros((x.shape[0], n)), np.zeros((x.shape[0], n)), []
    for t in range(x.shape[1]):
        xt = x[:, t]
        if type(cell).__name__ == "LSTMCell":
            z = xt @ k + h @ u + b
            i, f, g, o = sig(z[:, :n]), sig(z[:, n:2 * n]), np.tanh(z[:, 2 * n:3 * n]), sig(z[:, 3 * n:])
            c = f * c + i * g
            h = o * np.tanh(c)
            out.append((i, f, o))
        else:  # GRU, reset_after: bias[0] input bias, bias[1] recurrent bias
            xz, hz = xt @ k + b[0], h @ u + b[1]
            zg, r = sig(xz[:, :n] + hz[:, :n]), sig(xz[:, n:2 * n] + hz[:, n:2 * n])
            hh = np.tanh(xz[:, 2 * n:] + r * hz[:, 2 * n:])
            h = zg * h + (1 - zg) * hh
            out.append((zg, r))
    return [np.stack(g, axis=1) for g in zip(*out)]


@pytest.mark.parametrize("arch,names", [("lstm", ["input", "forget", "output"]), ("gru", ["update", "reset"])])
def test_gate_values_match_numpy(arch, names):
    m = _build(arch, (7, 3), 1, units=4, depth=2)
    x = np.random.default_rng(4).normal(size=(5, 7, 3))
    got = gate_values(m, x.astype("float32"))
    assert list(got) == ["block_000_rnn", "block_001_rnn"] and list(got["block_000_rnn"]) == names
    for g, want in zip(got["block_000_rnn"].values(), _np_gates(m, x)):
        np.testing.assert_allclose(g.numpy(), want, atol=1e-5)
    df = gate_statistics(m, x.astype("float32"))
    assert len(df) == 2 * len(names)
    row = df[(df.layer == "block_000_rnn") & (df.gate == names[0])].iloc[0]
    ref = _np_gates(m, x)[0]
    assert row["mean"] == pytest.approx(ref.mean(), abs=1e-5)
    assert row["frac_low"] == pytest.approx((ref < 0.05).mean()) and row["frac_high"] == pytest.approx((ref > 0.95).mean())


def test_gate_saturation_is_detected():
    # Forget bias 6: sigmoid(6 + small) > 0.95 almost everywhere; the input gate stays near 0.5.
    m = _build("lstm", (7, 2), 1, units=8, forget_bias=6.0)
    df = gate_statistics(m, np.random.default_rng(5).uniform(size=(16, 7, 2)).astype("float32")).set_index("gate")
    assert df.loc["forget", "frac_high"] > 0.9 and df.loc["forget", "frac_low"] == 0
    assert df.loc["input", "frac_high"] < 0.1 and 0.3 < df.loc["input", "mean"] < 0.7
    assert gate_statistics(_build("simple_rnn", (7, 2), 1, units=4), np.zeros((2, 7, 2), "float32")).empty
