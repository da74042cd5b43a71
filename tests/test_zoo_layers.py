"""Behaviour of the zoo's custom layers and axes: ReZero identity at init, highway gates, stochastic depth's
drop probabilities (Monte Carlo), DenseNet feature counts, initializer variances, LSUV."""

from __future__ import annotations

import math

import numpy as np
import pytest

import zoo

DIGITS = (8, 8, 1)


def build(name, **kw):
    import keras

    keras.utils.set_random_seed(kw.pop("seed", 0))
    return zoo.build(name, input_shape=kw.pop("input_shape", DIGITS), num_outputs=10, **kw)


def sub_model(model, start, end):
    import keras

    start = start[0] if isinstance(start, list) and len(start) == 1 else start
    return keras.Model(start, end)


# ------------------------------------------------------------------------------------------ ReZero


def test_rezero_mlp_is_exactly_the_identity_at_init():
    model = build("rezero_mlp", depth=6, width=16, dtype="float64", bias_init_std=0.5)
    stem = model.get_layer("stem_linear").output
    x = np.random.RandomState(0).normal(size=(5, *DIGITS))
    h0 = np.asarray(sub_model(model, model.inputs, stem)(x))
    for b in zoo.blocks(model):
        out = np.asarray(sub_model(model, model.inputs, b.layers["rezero"].output)(x))
        np.testing.assert_array_equal(out, h0)  # every block returns its input, bit for bit
        assert float(b.layers["rezero"].alpha.numpy()) == 0.0
        branch = np.asarray(sub_model(model, model.inputs, b.layers["branch"].output)(x))
        assert np.abs(branch).max() > 0  # ... although its branch computes something


def test_rezero_cnn_blocks_are_identities_within_a_stage():
    model = build("rezero_cnn", depth=6, width=4, dtype="float64")
    blocks = zoo.blocks(model)
    x = np.random.RandomState(1).normal(size=(2, *DIGITS))
    for b in blocks:
        if any(p == "shortcut" for p in b.layers):
            continue  # a stage's first block subsamples/pads on its skip path: not an identity map
        join = b.layers["rezero"]
        inp = np.asarray(sub_model(model, model.inputs, b.linear.input)(x))
        out = np.asarray(sub_model(model, model.inputs, join.output)(x))
        np.testing.assert_array_equal(out, inp)
    assert sum("shortcut" in b.layers for b in blocks) == 2


def test_rezero_layer_math_and_config():
    import keras

    from zoo.layers import ReZero

    layer = ReZero(alpha_init=0.3)
    x, f = np.ones((2, 3), "float32"), np.full((2, 3), 2.0, "float32")
    np.testing.assert_allclose(np.asarray(layer([x, f])), x + 0.3 * f, rtol=1e-6)
    assert [w.name for w in layer.trainable_weights] == ["alpha"]
    again = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(again, ReZero) and again.alpha_init == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------ highway


@pytest.mark.parametrize("gate_bias", [-1.0, -2.0, -3.0])
def test_highway_gate_mean_at_init_is_sigmoid_of_bias(gate_bias):
    model = build("highway_mlp", depth=3, width=32, gate_bias=gate_bias)
    gates = [b.layers["gate"] for b in zoo.blocks(model)]
    sig = 1.0 / (1.0 + math.exp(-gate_bias))
    rs = np.random.RandomState(0)
    # Zero input: T = sigmoid(b) exactly. Small inputs: the mean over units and examples stays at sigmoid(b)
    # (the kernel's contribution is symmetric around 0 and tiny).
    for x, tol in [(np.zeros((4, *DIGITS)), 1e-7), (1e-3 * rs.normal(size=(256, *DIGITS)), 1e-4)]:
        t = sub_model(model, model.inputs, [g.output for g in gates])(x.astype("float32"))
        for ti in t:
            assert abs(float(np.mean(ti)) - sig) < tol
    for g in gates:
        np.testing.assert_allclose(g.bias.numpy(), gate_bias)


def test_highway_block_mixes_transform_and_carry():
    model = build("highway_mlp", depth=1, width=8, activation="tanh", dtype="float64")
    b = zoo.blocks(model)[0]
    x = np.random.RandomState(2).normal(size=(4, *DIGITS))
    xin, h, t, y = (np.asarray(a) for a in sub_model(
        model, model.inputs, [b.linear.input, b.act.output, b.layers["gate"].output, b.layers["mix"].output])(x))
    kh, bh = b.linear.get_weights()
    kt, bt = b.layers["gate"].get_weights()
    np.testing.assert_allclose(h, np.tanh(xin @ kh + bh), rtol=1e-12)
    np.testing.assert_allclose(t, 1 / (1 + np.exp(-(xin @ kt + bt))), rtol=1e-12)
    np.testing.assert_allclose(y, h * t + xin * (1 - t), rtol=1e-12)
    # A shut gate carries the input through.
    shut = build("highway_mlp", depth=2, width=8, gate_bias=-40.0, dtype="float64")
    bs = zoo.blocks(shut)
    xin, y = (np.asarray(a) for a in sub_model(shut, shut.inputs, [bs[0].linear.input, bs[-1].layers["mix"].output])(x))
    np.testing.assert_allclose(y, xin, atol=1e-12)


# ------------------------------------------------------------------------------------------ stochastic depth


def test_stochastic_depth_batch_mode_drop_rate_monte_carlo():
    import tensorflow as tf

    from zoo.layers import StochasticDepth

    p, n = 0.7, 4000
    layer = StochasticDepth(p, "batch", seed=1)
    x, f = tf.zeros((3, 4)), tf.ones((3, 4))

    @tf.function
    def draws(count):
        return tf.map_fn(lambda _: layer([x, f], training=True), tf.range(count), fn_output_signature=tf.float32)

    out = draws(tf.constant(n)).numpy()  # (n, 3, 4)
    kept = out.reshape(n, -1)
    assert np.all((kept == 0) | (kept == 1))
    # Batch mode: the whole mini-batch shares one draw.
    assert np.all(kept.min(axis=1) == kept.max(axis=1))
    rate = kept[:, 0].mean()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard errors
    assert float(layer.active.numpy()) in (0.0, 1.0)


def test_stochastic_depth_sample_mode_drop_rate_monte_carlo():
    from zoo.layers import StochasticDepth

    p, n = 0.4, 20000
    layer = StochasticDepth(p, "sample", seed=2)
    x, f = np.zeros((n, 3), "float32"), np.ones((n, 3), "float32")
    out = np.asarray(layer([x, f], training=True))
    assert np.all(out.min(axis=1) == out.max(axis=1))  # one draw per example, shared by its features
    rate = out[:, 0].mean()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert float(layer.active.numpy()) == pytest.approx(rate, abs=1e-6)


def test_stochastic_depth_inference_is_deterministic_and_scaled():
    from zoo.layers import StochasticDepth

    layer = StochasticDepth(0.6, "batch")
    x = np.random.RandomState(0).normal(size=(5, 3)).astype("float32")
    f = np.random.RandomState(1).normal(size=(5, 3)).astype("float32")
    a, b = np.asarray(layer([x, f], training=False)), np.asarray(layer([x, f]))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, x + 0.6 * f, rtol=1e-6)
    with pytest.raises(ValueError, match="mode must be one of batch, sample"):
        StochasticDepth(0.5, "row")
    with pytest.raises(ValueError, match=r"survival_prob must be in \(0, 1\]"):
        StochasticDepth(0.0)


@pytest.mark.parametrize("name", ["stochastic_depth_mlp", "stochastic_depth_cnn"])
def test_stochastic_depth_survival_rules(name):
    depth, p_last = 6, 0.5
    model = build(name, depth=depth, width=4, survival_prob=p_last, mode="sample")
    probs = [b.layers["stochastic_depth"].survival_prob for b in zoo.blocks(model)]
    # Huang et al. 2016: p_l = 1 - (l / L)(1 - p_L), l = 1..L
    np.testing.assert_allclose(probs, [1 - (l / depth) * (1 - p_last) for l in range(1, depth + 1)])
    assert probs[-1] == pytest.approx(p_last)
    assert sum(probs) == pytest.approx((3 * depth - 1) / 4)  # expected active blocks (3L - 1)/4 (the paper)
    assert {b.layers["stochastic_depth"].mode for b in zoo.blocks(model)} == {"sample"}
    uni = build(name, depth=depth, width=4, survival_prob=0.8, survival_rule="uniform")
    assert [b.layers["stochastic_depth"].survival_prob for b in zoo.blocks(uni)] == [0.8] * depth
    with pytest.raises(ValueError, match="survival_rule must be one of linear, uniform"):
        build(name, depth=2, survival_rule="exp")


def test_stochastic_depth_model_is_random_in_training_and_fixed_at_inference():
    model = build("stochastic_depth_mlp", depth=8, width=8, survival_prob=0.5)
    x = np.random.RandomState(3).normal(size=(4, *DIGITS)).astype("float32")
    train = [np.asarray(model(x, training=True)) for _ in range(6)]
    assert any(not np.array_equal(train[0], t) for t in train[1:])
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(model(x, training=False)))


# ------------------------------------------------------------------------------------------ DenseNet


def test_densenet_feature_counts_follow_growth_rate():
    k, width = 5, 8
    mlp = build("densenet_mlp", depth=6, width=width, growth_rate=k, stages=2, compression=0.5, bottleneck=True)
    counts = [int(b.layers["concat"].output.shape[-1]) for b in zoo.blocks(mlp)]
    after_transition = math.floor(0.5 * (width + 3 * k))
    assert counts == [width + k, width + 2 * k, width + 3 * k,
                      after_transition + k, after_transition + 2 * k, after_transition + 3 * k]
    assert zoo.blocks(mlp)[2].layers["transition_linear"].units == after_transition
    assert zoo.blocks(mlp)[0].layers["linear"].units == 4 * k  # bottleneck
    assert zoo.blocks(mlp)[0].layers["linear2"].units == k

    cnn = build("densenet_cnn", depth=6, width=6, growth_rate=3, stages=3)
    blocks = zoo.blocks(cnn)
    shapes = [tuple(b.layers["concat"].output.shape[1:]) for b in blocks]
    assert shapes == [(8, 8, 9), (8, 8, 12), (4, 4, 15), (4, 4, 18), (2, 2, 21), (2, 2, 24)]
    assert "transition_pool" in blocks[1].layers and "transition_pool" not in blocks[5].layers


# ------------------------------------------------------------------------------------------ initializers


FAN_IN, FAN_OUT = 300, 200


def _var_ok(w, expected, excess_kurtosis):
    w = np.asarray(w, dtype=np.float64).ravel()
    se = expected * math.sqrt((2 + excess_kurtosis) / w.size)  # std error of a sample variance
    assert abs(w.var() - expected) < 5 * se, (w.var(), expected)
    assert abs(w.mean()) < 5 * math.sqrt(expected / w.size)


@pytest.mark.parametrize("name,options,expected,kurt", [
    ("glorot_uniform", {}, 2 / (FAN_IN + FAN_OUT), -1.2),
    ("glorot_normal", {}, 2 / (FAN_IN + FAN_OUT), 0.0),
    ("he_uniform", {}, 2 / FAN_IN, -1.2),
    ("he_normal", {}, 2 / FAN_IN, 0.0),
    ("lecun_normal", {}, 1 / FAN_IN, 0.0),
    ("lecun_uniform", {}, 1 / FAN_IN, -1.2),
    ("standard", {}, 1 / (3 * FAN_IN), -1.2),
    ("variance_scaling", {"scale": 1.7, "mode": "fan_out", "distribution": "normal"}, 1.7 / FAN_OUT, 0.0),
    ("variance_scaling", {"scale": 2.5, "mode": "fan_avg", "distribution": "uniform"}, 5 / (FAN_IN + FAN_OUT), -1.2),
    ("variance_scaling", {"scale": 0.5}, 0.5 / FAN_IN, 0.0),
])
def test_initializer_variances_match_their_formulas(name, options, expected, kurt):
    from zoo.initializers import make_initializer

    # Excess kurtosis: uniform -1.2, normal 0; truncated normals (Keras corrects their std) are below 0,
    # so 0 is a safe bound for them.
    _var_ok(make_initializer(name, **options)(shape=(FAN_IN, FAN_OUT)), expected, kurt)


def test_initializer_variance_on_conv_kernels_uses_receptive_field_fan_in():
    from zoo.initializers import make_initializer

    w = make_initializer("he_normal")(shape=(3, 3, 32, 64))
    _var_ok(w, 2 / (3 * 3 * 32), 0.0)


@pytest.mark.parametrize("name", ["orthogonal", "lsuv"])
def test_orthogonal_and_lsuv_start_are_orthonormal_with_gain(name):
    from zoo.initializers import make_initializer

    w = np.asarray(make_initializer(name, gain=1.5)(shape=(64, 64)), dtype=np.float64)
    np.testing.assert_allclose(w.T @ w, 2.25 * np.eye(64), atol=1e-5)  # variance gain^2 / n per entry


def test_initializers_reach_the_models():
    model = build("highway_cnn", depth=1, width=64, initializer="variance_scaling",
                  initializer_options={"scale": 3.0, "distribution": "normal"}, bias_init_std=0.2)
    _var_ok(model.get_layer("block_000_linear").kernel, 3.0 / (9 * 64), 0.0)
    _var_ok(model.get_layer("block_000_linear").bias, 0.04, 0.0)


# ------------------------------------------------------------------------------------------ LSUV


@pytest.mark.parametrize("name,kw", [
    ("plain_mlp", dict(depth=6, width=32, activation="tanh")),
    ("resnet_cnn", dict(depth=3, width=8, norm="none")),
    ("highway_mlp", dict(depth=3, width=16)),
])
def test_lsuv_brings_every_layer_output_variance_to_one(name, kw):
    from zoo import lsuv

    model = build(name, initializer="lsuv", **kw)
    x = np.random.RandomState(0).uniform(0, 16, size=(128, *DIGITS)).astype("float32")  # digits' pixel range
    tol = 0.05
    result = lsuv.apply(model, x, tol=tol, max_iter=10)
    targets = lsuv.lsuv_layers(model)
    assert set(result) == {layer.name for layer in targets}
    assert not any(layer.name.endswith("_gate") for layer in targets)  # sigmoid gates are left alone
    outs = sub_model(model, model.inputs, [layer.output for layer in targets])(x)
    for layer, out in zip(targets, outs):
        assert abs(np.var(np.asarray(out, dtype=np.float64)) - 1.0) < tol, layer.name


def test_lsuv_fails_clearly():
    from zoo import lsuv

    model = build("plain_mlp", depth=2, width=8, initializer="lsuv")
    with pytest.raises(lsuv.LSUVError, match="layer 'block_000_linear': its output variance on the batch is 0"):
        lsuv.apply(model, np.zeros((8, *DIGITS), "float32"))
    biased = build("plain_mlp", depth=2, width=8, initializer="lsuv", bias_init_std=3.0)
    x = np.random.RandomState(0).normal(size=(64, *DIGITS)).astype("float32")
    with pytest.raises(lsuv.LSUVError, match="did not converge on layer 'block_000_linear'.* after 1 rescalings"):
        lsuv.apply(biased, x, tol=1e-6, max_iter=1)


def test_runner_applies_lsuv_with_a_training_batch(tfds_dir, tmp_path):
    """``initializer: lsuv`` in YAML: the runner rescales the built net on a batch of the arm's data (its
    options reach LSUV), and a non-converging LSUV fails the arm with the LSUV message."""
    import json

    from ablations.config import parse_experiment
    from ablations.runner import run_arm

    base = {"name": "lsuv", "data": {"batch_size": 32},
            "model": {"arch": "plain_mlp", "depth": 3, "width": 16, "activation": "tanh", "initializer": "lsuv"},
            "train": {"epochs": 1, "steps_per_epoch": 2}}
    arm = parse_experiment(base).arms()[0]
    summary = run_arm(arm, tmp_path / "ok")
    assert summary["status"] == "completed", summary["error"]
    bad = dict(base, model={**base["model"], "bias_init_std": 3.0,
                            "initializer_options": {"tol": 1e-6, "max_iter": 1}})
    summary = run_arm(parse_experiment(bad).arms()[0], tmp_path / "bad")
    assert summary["status"] == "failed"
    assert "LSUVError: LSUV did not converge on layer 'block_000_linear'" in summary["error"]
    assert json.loads((tmp_path / "bad" / "summary.json").read_text())["status"] == "failed"
