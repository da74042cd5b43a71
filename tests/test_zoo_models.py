"""Every feedforward zoo model: builds, output shape, gradients reach every variable, closed-form parameter
counts, identical outputs after a ``.keras`` round trip, paper-scale depths, and the skip-connection effect
on gradients at init (probe's ``measure``)."""

from __future__ import annotations

import numpy as np
import pytest

import zoo

N_OUT = 10
DIGITS = (8, 8, 1)
CIFAR = (32, 32, 3)

MLPS = ["plain_mlp", "resnet_mlp", "highway_mlp", "densenet_mlp", "stochastic_depth_mlp", "rezero_mlp"]
CNNS = ["plain_cnn", "resnet_cnn", "highway_cnn", "densenet_cnn", "stochastic_depth_cnn", "rezero_cnn"]
FEEDFORWARD = MLPS + CNNS

# Small instances; ReZero starts at alpha = 0.1 so its branches get gradients (at 0 only alpha would).
SMALL = {name: dict(depth=3, width=8 if name in MLPS else 4) for name in FEEDFORWARD}
SMALL["densenet_mlp"].update(growth_rate=4)
SMALL["densenet_cnn"].update(growth_rate=2)
SMALL["rezero_mlp"].update(alpha_init=0.1)
SMALL["rezero_cnn"].update(alpha_init=0.1)

_cache: dict = {}


def small(name: str, input_shape: tuple[int, ...] = DIGITS):
    key = (name, input_shape)
    if key not in _cache:
        import keras

        keras.utils.set_random_seed(0)
        _cache[key] = zoo.build(name, input_shape=input_shape, num_outputs=N_OUT, **SMALL[name])
    return _cache[key]


def batch(shape, n=6, seed=0):
    return np.random.RandomState(seed).normal(size=(n, *shape)).astype("float32")


# ------------------------------------------------------------------------------------------ closed forms


def dense(a: int, b: int) -> int:
    return a * b + b


def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


BN = 2  # trainable parameters per channel of a BatchNormalization (gamma, beta); 2 more are non-trainable

N_IN = 64


def expected_trainable(name: str) -> int:
    """Hand-derived trainable-parameter counts of the SMALL instances on 8x8x1 inputs (depth 3)."""
    if name == "plain_mlp":  # 64 -> 8 -> 8 -> 8 -> 10
        return dense(64, 8) + 2 * dense(8, 8) + dense(8, 10)
    if name == "resnet_mlp":  # stem 64 -> 8; 3 blocks of two 8x8 layers
        return dense(64, 8) + 3 * 2 * dense(8, 8) + dense(8, 10)
    if name == "highway_mlp":  # H and T per block
        return dense(64, 8) + 3 * 2 * dense(8, 8) + dense(8, 10)
    if name == "stochastic_depth_mlp":
        return dense(64, 8) + 3 * 2 * dense(8, 8) + dense(8, 10)
    if name == "rezero_mlp":  # one layer + alpha per block
        return dense(64, 8) + 3 * (dense(8, 8) + 1) + dense(8, 10)
    if name == "densenet_mlp":  # k = 4: blocks see 8, 12, 16 features; the head sees 20
        return dense(64, 8) + dense(8, 4) + dense(12, 4) + dense(16, 4) + dense(20, 10)
    if name == "plain_cnn":  # stem 1->4, stages 4->4, 4->8, 8->16, each conv + BN
        return conv(3, 1, 4) + BN * 4 + conv(3, 4, 4) + BN * 4 + conv(3, 4, 8) + BN * 8 + conv(3, 8, 16) \
            + BN * 16 + dense(16, 10)
    if name in ("resnet_cnn", "stochastic_depth_cnn"):  # option A: shortcuts have no parameters
        return conv(3, 1, 4) + BN * 4 \
            + conv(3, 4, 4) + BN * 4 + conv(3, 4, 4) + BN * 4 \
            + conv(3, 4, 8) + BN * 8 + conv(3, 8, 8) + BN * 8 \
            + conv(3, 8, 16) + BN * 16 + conv(3, 16, 16) + BN * 16 + dense(16, 10)
    if name == "rezero_cnn":  # no normalisation; alpha per block
        return conv(3, 1, 4) + conv(3, 4, 4) + conv(3, 4, 4) + conv(3, 4, 8) + conv(3, 8, 8) \
            + conv(3, 8, 16) + conv(3, 16, 16) + 3 + dense(16, 10)
    if name == "highway_cnn":  # constant width 4, H and T 3x3 convs
        return conv(3, 1, 4) + 3 * 2 * conv(3, 4, 4) + dense(4, 10)
    if name == "densenet_cnn":  # k = 2, stages of one layer: 4 -> 6 | transition 6 | 6 -> 8 | transition 8 | 8 -> 10
        return conv(3, 1, 4) + BN * 4 + conv(3, 4, 2) + BN * 6 + conv(1, 6, 6) + BN * 6 + conv(3, 6, 2) \
            + BN * 8 + conv(1, 8, 8) + BN * 8 + conv(3, 8, 2) + BN * 10 + dense(10, 10)
    raise KeyError(name)


def expected_non_trainable(name: str) -> int:
    """BatchNorm moving mean/variance (2 per channel) and stochastic depth's `active` flags."""
    bn_channels = {"plain_cnn": 4 + 4 + 8 + 16, "resnet_cnn": 4 + 2 * (4 + 8 + 16),
                   "stochastic_depth_cnn": 4 + 2 * (4 + 8 + 16), "densenet_cnn": 4 + 6 + 6 + 8 + 8 + 10}
    flags = 3 if name.startswith("stochastic_depth") else 0
    return 2 * bn_channels.get(name, 0) + flags


# ------------------------------------------------------------------------------------------ every model


def test_every_feedforward_model_is_registered_with_family_and_paper():
    names = zoo.names()
    for name in FEEDFORWARD:
        assert name in names
        assert zoo.family(name) == ("mlp" if name in MLPS else "cnn")
        assert zoo.paper(name)
        opts = zoo.options(name)
        for axis in ("depth", "width", "activation", "initializer", "bias_init_std", "norm", "norm_position",
                     "dropout", "dtype"):
            assert axis in opts, (name, axis)


@pytest.mark.parametrize("name", FEEDFORWARD)
def test_builds_tags_blocks_and_outputs_logits(name):
    model = small(name)
    y = np.asarray(model(batch(DIGITS), training=False))
    assert y.shape == (6, N_OUT) and np.all(np.isfinite(y))
    blocks = zoo.blocks(model)
    assert [b.index for b in blocks] == [0, 1, 2]
    for b in blocks:
        assert b.linear is not None and b.act is not None, (name, b.prefix, sorted(b.layers))
        assert b.linear.__class__.__name__ in ("Dense", "Conv2D")
    for layer in model.layers:
        assert layer.name == "input" or layer.name.startswith(("block_", "stem_", "head_")), layer.name
    if name in CNNS:  # the CIFAR shape works too
        big = small(name, CIFAR)
        assert np.asarray(big(batch(CIFAR, n=2), training=False)).shape == (2, N_OUT)


@pytest.mark.parametrize("name", FEEDFORWARD)
def test_parameter_count_matches_closed_form(name):
    model = small(name)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == expected_trainable(name)
    assert model.count_params() == expected_trainable(name) + expected_non_trainable(name)


@pytest.mark.parametrize("name", FEEDFORWARD)
def test_every_trainable_variable_receives_a_gradient(name):
    import tensorflow as tf

    model = small(name)
    x = tf.constant(batch(DIGITS, n=16, seed=1))
    y = tf.constant(np.arange(16) % N_OUT)
    # Inference mode: with batch statistics a bias right before BatchNorm gets an exactly-zero gradient by
    # construction, and stochastic depth would drop branches; here we test that every variable is wired in.
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, model(x, training=False),
                                                                               from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
        assert g is not None, v.path
        assert float(tf.norm(g)) > 0, v.path


@pytest.mark.parametrize("name", FEEDFORWARD)
def test_keras_round_trip_gives_identical_outputs(name, tmp_path):
    import keras

    model = small(name)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = batch(DIGITS, seed=2)
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(loaded(x, training=False)))
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------ options


def test_resnet_cnn_option_b_and_preact_parameter_counts():
    b = zoo.build("resnet_cnn", input_shape=DIGITS, num_outputs=N_OUT, depth=3, width=4, shortcut="B")
    projections = conv(1, 4, 8) + BN * 8 + conv(1, 8, 16) + BN * 16  # only where the shape changes
    trainable = sum(int(np.prod(v.shape)) for v in b.trainable_variables)
    assert trainable == expected_trainable("resnet_cnn") + projections
    assert {layer.name for layer in b.layers} >= {"block_001_shortcut", "block_002_shortcut"}
    assert "block_000_shortcut" not in {layer.name for layer in b.layers}

    pre = zoo.build("resnet_cnn", input_shape=DIGITS, num_outputs=N_OUT, depth=3, width=4, preact=True)
    # stem conv only; each block BN(c_in) conv BN(c) conv; final BN before pooling
    want = conv(3, 1, 4) + BN * 4 + conv(3, 4, 4) + BN * 4 + conv(3, 4, 4) \
        + BN * 4 + conv(3, 4, 8) + BN * 8 + conv(3, 8, 8) \
        + BN * 8 + conv(3, 8, 16) + BN * 16 + conv(3, 16, 16) + BN * 16 + dense(16, 10)
    assert sum(int(np.prod(v.shape)) for v in pre.trainable_variables) == want
    assert "block_000_post_act" not in {layer.name for layer in pre.layers}
    # Pre-activation: the block's activation comes before its first convolution.
    blk = zoo.blocks(pre)[0]
    assert blk.linear.input is blk.act.output


def test_option_a_shortcut_subsamples_and_zero_pads():
    import keras

    from zoo.layers import PadShortcut

    x = np.random.RandomState(0).normal(size=(2, 8, 8, 4)).astype("float32")
    y = np.asarray(PadShortcut(8, 2)(x))
    assert y.shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(y[..., 2:6], x[:, ::2, ::2, :])
    assert np.all(y[..., :2] == 0) and np.all(y[..., 6:] == 0)
    layer = keras.layers.deserialize(keras.layers.serialize(PadShortcut(8, 2)))
    assert (layer.channels, layer.stride) == (8, 2)


@pytest.mark.parametrize("depth,layers,paper_params", [(9, 20, 0.27e6), (54, 110, 1.7e6)])
def test_cifar_resnet_paper_depths_build_with_paper_sizes(depth, layers, paper_params):
    model = zoo.build("resnet_cnn", input_shape=CIFAR, num_outputs=10, depth=depth)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert len(convs) + 1 == layers  # 6n+2 weighted layers: convs + the linear head
    n = depth // 3  # closed form for option A: stem, 3 stages of n blocks, head
    want = conv(3, 3, 16) + BN * 16 + dense(64, 10)
    for stage, f in enumerate((16, 32, 64)):
        f_in = 16 if stage == 0 else f // 2
        want += conv(3, f_in, f) + conv(3, f, f) + 2 * BN * f + (n - 1) * (2 * conv(3, f, f) + 2 * BN * f)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == want
    assert abs(trainable - paper_params) / paper_params < 0.025  # He et al. 2016 Table 6: 0.27M, 1.7M


def test_resnet_32_and_56_build():
    for depth in (15, 27):
        model = zoo.build("resnet_cnn", input_shape=CIFAR, num_outputs=10, depth=depth, shortcut="B")
        assert len(zoo.blocks(model)) == depth
        assert [len([b for b in zoo.blocks(model) if b.linear.filters == f]) for f in (16, 32, 64)] == [depth // 3] * 3


def test_norm_position_and_groups():
    pre = zoo.build("plain_mlp", input_shape=DIGITS, num_outputs=N_OUT, depth=2, width=8, norm="group",
                    norm_groups=4)
    post = zoo.build("rezero_mlp", input_shape=DIGITS, num_outputs=N_OUT, depth=2, width=8, norm="layer",
                     norm_position="post_act")
    b = zoo.blocks(pre)[0]
    assert b.layers["norm"].input is b.linear.output and b.act.input is b.layers["norm"].output
    assert b.layers["norm"].groups == 4
    b = zoo.blocks(post)[0]
    assert b.act.input is b.linear.output and b.layers["norm"].input is b.act.output
    for name in ("plain_mlp", "resnet_cnn", "densenet_mlp"):
        with pytest.raises(ValueError, match="norm_position must be one of pre_act, post_act"):
            zoo.build(name, input_shape=DIGITS, num_outputs=N_OUT, depth=1, norm_position="after")
    with pytest.raises(ValueError, match="shortcut must be one of A, B"):
        zoo.build("resnet_cnn", input_shape=DIGITS, num_outputs=N_OUT, depth=3, shortcut="C")
    with pytest.raises(zoo.UnknownNameError, match="unknown normalization 'batchnorm'"):
        zoo.build("highway_mlp", input_shape=DIGITS, num_outputs=N_OUT, depth=1, norm="batchnorm")


def test_float64_and_selu_alpha_dropout():
    model = zoo.build("densenet_mlp", input_shape=DIGITS, num_outputs=N_OUT, depth=2, width=8, dtype="float64",
                      activation="selu", initializer="lecun_normal", dropout=0.1)
    assert {v.dtype for v in model.weights} == {"float64"}
    assert np.asarray(model(np.zeros((1, *DIGITS)))).dtype == np.float64
    assert model.get_layer("block_000_dropout").__class__.__name__ == "AlphaDropout"


# ------------------------------------------------------------------------------------------ depth


@pytest.mark.parametrize("name", ["rezero_mlp", "resnet_mlp"])
def test_deep_mlp_builds_and_trains_a_step(name):
    _deep_train_step(name, depth=50)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rezero_mlp", "resnet_mlp"])
def test_depth_1000_builds_and_trains_a_step(name):
    _deep_train_step(name, depth=1000)


def _deep_train_step(name: str, depth: int) -> None:
    import keras

    keras.utils.set_random_seed(0)
    extra = {"branch_scale": "inv_sqrt_depth"} if name == "resnet_mlp" else {}
    model = zoo.build(name, input_shape=DIGITS, num_outputs=N_OUT, depth=depth, width=64, **extra)
    assert len(zoo.blocks(model)) == depth
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.asarray(v) for v in model.trainable_variables]
    x, y = batch(DIGITS, n=32), np.arange(32) % N_OUT
    loss = model.train_on_batch(x, y)  # one compiled step: the graph, not Python, loops over the layers
    assert np.isfinite(loss)
    changed = [not np.array_equal(b, np.asarray(v)) for b, v in zip(before, model.trainable_variables)]
    if name == "rezero_mlp":  # at alpha = 0 only the alphas, stem and head get gradients on the first step
        assert all(changed[i] for i, v in enumerate(model.trainable_variables) if v.name == "alpha")
    else:
        assert all(changed)


# ------------------------------------------------------------------------------------------ the effect


def test_skip_connections_keep_the_first_block_gradient_at_init():
    """Glorot & Bengio 2010 vs He et al. 2016: at init, sigmoid' <= 1/4 per layer starves the first block of
    a deep plain net, while identity skips keep its gradient comparable to the last block's."""
    import keras

    from ablations import measure
    from ablations.diagnose import block_kernels

    depth, width = 20, 32
    x = np.random.RandomState(0).uniform(size=(64, *DIGITS)).astype("float32")
    y = np.arange(64) % N_OUT
    ratios = {}
    for name, extra in [("plain_mlp", {}), ("resnet_mlp", {"branch_scale": "inv_sqrt_depth"})]:
        keras.utils.set_random_seed(0)
        model = zoo.build(name, input_shape=DIGITS, num_outputs=N_OUT, depth=depth, width=width,
                          activation="sigmoid", **extra)
        df = measure(model, (x, y), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        k = block_kernels(df).sort_values("depth")
        assert len(k) == depth
        ratios[name] = float(k["grad_norm"].iloc[0] / k["grad_norm"].iloc[-1])
        # dL/d(pre-activation) too, the quantity that actually vanishes
        pre = df.drop_duplicates("depth").query("depth >= 0").sort_values("depth")["act_grad_norm"].to_numpy()
        ratios[name + "_pre"] = float(pre[0] / pre[-1])
    assert ratios["plain_mlp"] < 1e-4
    assert 0.1 < ratios["resnet_mlp"] < 10
    assert ratios["plain_mlp"] < 1e-3 * ratios["resnet_mlp"]
    assert ratios["plain_mlp_pre"] < 1e-3 * ratios["resnet_mlp_pre"]
