"""Model zoo and registries: loud lookups, block tagging, initializers, parameter counts, .keras round trips."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import zoo
from zoo.registry import Registry, UnknownNameError, suggest

INPUT_SHAPE = (8, 8, 1)
N_IN = 64
N_OUT = 10


def build(arch: str, **kw):
    kw.setdefault("depth", 3)
    kw.setdefault("width", 8)
    return zoo.build(arch, input_shape=INPUT_SHAPE, num_outputs=N_OUT, **kw)


# ------------------------------------------------------------------------------------------ name lookups


def test_names_lists_the_mlps():
    names = zoo.names()
    assert "plain_mlp" in names and "resnet_mlp" in names
    assert names == sorted(names)
    assert zoo.family("plain_mlp") == "mlp" and zoo.family("resnet_mlp") == "mlp"
    assert "Glorot" in zoo.paper("plain_mlp") and "He" in zoo.paper("resnet_mlp")


def test_unknown_model_lists_known_names_and_suggests_close_match():
    with pytest.raises(zoo.UnknownNameError) as info:
        zoo.build("resnet_mlpp", input_shape=INPUT_SHAPE, num_outputs=N_OUT)
    err = info.value
    msg = str(err)
    assert "unknown model 'resnet_mlpp'" in msg
    assert "Did you mean 'resnet_mlp'?" in msg
    for name in zoo.names():
        assert name in msg.split("Known models:")[1]
    assert err.suggestion == "resnet_mlp"
    assert err.known == sorted(zoo.names())
    # Both a KeyError and a ValueError, and str() is not KeyError's quoted repr.
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert not msg.startswith(("'", '"'))


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownNameError) as info:
        zoo.options("zzzzzzzzzz")
    assert info.value.suggestion is None
    assert "Did you mean" not in str(info.value)
    assert suggest("zzzzzzzzzz", ["plain_mlp"]) == ""
    assert suggest("plain_mpl", ["plain_mlp", "resnet_mlp"]) == " Did you mean 'plain_mlp'?"


def test_unknown_option_names_the_closest_option():
    with pytest.raises(zoo.BadOptionError) as info:
        zoo.build("plain_mlp", input_shape=INPUT_SHAPE, num_outputs=N_OUT, dpeth=3)
    msg = str(info.value)
    assert "no option 'dpeth'" in msg
    assert "Did you mean 'depth'?" in msg
    allowed = msg.split("Options of plain_mlp:")[1]
    for opt in ("depth", "width", "activation", "initializer", "dtype"):
        assert opt in allowed
    # Data arguments are supplied by the runner, never listed as options.
    assert "input_shape" not in allowed and "num_outputs" not in allowed


def test_options_reports_defaults():
    opts = zoo.options("resnet_mlp")
    assert opts["depth"][0] == 4
    assert opts["width"][0] == 64
    assert opts["post_activation"][0] is False
    assert "input_shape" not in opts and "num_outputs" not in opts


def test_unknown_activation_and_initializer_list_known_names():
    from zoo.activations import ACTIVATIONS, make_activation
    from zoo.initializers import INITIALIZERS, make_initializer

    with pytest.raises(UnknownNameError) as info:
        make_activation("sigmoidd", "block_000_act")
    msg = str(info.value)
    assert "unknown activation 'sigmoidd'" in msg and "Did you mean 'sigmoid'?" in msg
    assert all(n in msg for n in ACTIVATIONS.names())
    assert {"relu", "sigmoid", "tanh", "leaky_relu"} <= set(ACTIVATIONS.names())

    with pytest.raises(UnknownNameError) as info:
        make_initializer("he_unifrom")
    msg = str(info.value)
    assert "unknown initializer 'he_unifrom'" in msg and "Did you mean 'he_uniform'?" in msg
    assert all(n in msg for n in INITIALIZERS.names())
    assert "standard" in INITIALIZERS.names()

    # The same error surfaces through zoo.build.
    with pytest.raises(UnknownNameError, match="unknown activation 'rleu'"):
        build("plain_mlp", activation="rleu")


def test_registry_rejects_double_registration_and_reports_meta():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1, paper="p")

    @reg.register("b")
    def _b():  # decorator form returns the object unchanged
        return 2

    assert reg.get("a") == 1 and reg.get("b")() == 2
    assert reg.meta("a") == {"paper": "p"}
    assert list(reg) == ["a", "b"] and "a" in reg and "c" not in reg
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 3)
    with pytest.raises(UnknownNameError, match="Known widgets: a, b"):
        reg.get("c")
    with pytest.raises(UnknownNameError):
        reg.get(["unhashable"])  # a YAML list where a name was expected


# ------------------------------------------------------------------------------------------ block tagging


def test_block_name_padding_and_parsing():
    assert zoo.block_name(7, "linear") == "block_007_linear"
    assert zoo.block_name(7, "act", depth=16) == "block_007_act"
    assert zoo.block_name(12, "linear", depth=2000) == "block_0012_linear"
    assert zoo.parse_layer_name("block_0012_linear2") == (12, "linear2")
    assert zoo.parse_layer_name("stem_linear") is None
    assert zoo.layer_role("block_003_act") == ("block", 3)
    assert zoo.layer_role("stem_flatten") == ("stem", -1)
    assert zoo.layer_role("head_linear") == ("head", -1)
    assert zoo.layer_role("input") == ("other", -1)


@pytest.mark.parametrize("arch,extra_parts", [("plain_mlp", set()), ("resnet_mlp", {"linear2", "add"})])
def test_blocks_are_ordered_and_tagged(arch, extra_parts):
    depth = 4
    model = build(arch, depth=depth, width=8, activation="tanh")
    blocks = zoo.blocks(model)
    assert [b.index for b in blocks] == list(range(depth))
    for b in blocks:
        assert b.prefix == f"block_{b.index:03d}"
        assert set(b.layers) == {"linear", "act"} | extra_parts
        assert b.linear.name == f"block_{b.index:03d}_linear"
        assert b.act.name == f"block_{b.index:03d}_act"
        assert b.linear.units == 8
    # Every layer is block_NNN_part, stem_* / head_*, or the input.
    pattern = re.compile(r"^(block_\d{3}_[a-z0-9_]+|stem_[a-z]+|head_linear|input)$")
    for layer in model.layers:
        assert pattern.match(layer.name), layer.name
    # Blocks appear in the model in depth order (block i's linear comes before block i+1's).
    order = [layer.name for layer in model.layers]
    linear_pos = [order.index(b.linear.name) for b in blocks]
    assert linear_pos == sorted(linear_pos)


def test_norm_and_dropout_layers_are_tagged():
    model = build("plain_mlp", depth=2, norm="layer", dropout=0.1)
    for b in zoo.blocks(model):
        assert set(b.layers) == {"linear", "norm", "act", "dropout"}


def test_resnet_branch_scale():
    import keras

    depth = 4
    model = build("resnet_mlp", depth=depth, branch_scale="inv_sqrt_depth", dtype="float64")
    for b in zoo.blocks(model):
        assert set(b.layers) == {"linear", "act", "linear2", "branch_scale", "add"}
        assert b.layers["branch_scale"].scale == pytest.approx(1.0 / math.sqrt(depth))
    # The block computes x + scale * linear2(act(linear(x))).
    x = np.random.RandomState(1).normal(size=(3, 8))
    b0 = zoo.blocks(model)[0]
    sub = keras.Model(b0.linear.input, b0.layers["add"].output)
    k1, c1 = b0.linear.get_weights()
    k2, c2 = b0.layers["linear2"].get_weights()
    want = x + 0.5 * (np.maximum(x @ k1 + c1, 0) @ k2 + c2)
    np.testing.assert_allclose(np.asarray(sub(x)), want, rtol=1e-12)
    # Default 1.0: no extra layer.
    assert "branch_scale" not in zoo.blocks(build("resnet_mlp", depth=2))[0].layers
    with pytest.raises(ValueError, match="branch_scale must be a number or 'inv_sqrt_depth'"):
        build("resnet_mlp", branch_scale="sqrt")


# ------------------------------------------------------------------------------------------ initializers


def test_standard_initializer_variance_is_one_third_over_fan_in():
    from zoo.initializers import make_initializer

    fan_in, units = 100, 1000
    w = np.asarray(make_initializer("standard")(shape=(fan_in, units))).astype(np.float64).ravel()
    a = 1.0 / math.sqrt(fan_in)
    expected = a * a / 3.0  # U[-a, a]
    # Standard error of the sample variance of U[-a, a]: sqrt(E[w^4] - E[w^2]^2 / n) = a^2 sqrt(4/45 / n).
    se = a * a * math.sqrt(4.0 / 45.0 / w.size)
    assert abs(w.var() - expected) < 5 * se
    assert np.abs(w).max() <= a * (1 + 1e-6)
    assert np.abs(w).max() > 0.99 * a  # uniform, so it reaches the bound
    assert abs(w.mean()) < 5 * math.sqrt(expected / w.size)


def test_standard_initializer_is_wired_into_the_models():
    model = build("plain_mlp", depth=2, width=512, initializer="standard", bias_init_std=0.0)
    k = model.get_layer("block_001_linear").kernel.numpy().astype(np.float64).ravel()  # fan_in 512
    fan_in = 512
    expected = 1.0 / (3.0 * fan_in)
    se = (1.0 / fan_in) * math.sqrt(4.0 / 45.0 / k.size)
    assert abs(k.var() - expected) < 5 * se
    assert np.all(model.get_layer("block_001_linear").bias.numpy() == 0)


def test_bias_init_std():
    model = build("plain_mlp", depth=1, width=2000, bias_init_std=0.5)
    b = model.get_layer("block_000_linear").bias.numpy().astype(np.float64)
    se = 0.25 * math.sqrt(2.0 / b.size)  # std error of a normal sample variance
    assert abs(b.var() - 0.25) < 5 * se


# ------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("depth,width", [(2, 8), (3, 16)])
def test_plain_mlp_parameter_count(depth, width):
    model = build("plain_mlp", depth=depth, width=width)
    expected = (N_IN * width + width) + (depth - 1) * (width * width + width) + (width * N_OUT + N_OUT)
    assert model.count_params() == expected
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == expected


@pytest.mark.parametrize("depth,width", [(2, 8), (3, 16)])
def test_resnet_mlp_parameter_count(depth, width):
    model = build("resnet_mlp", depth=depth, width=width)
    stem = N_IN * width + width
    per_block = 2 * (width * width + width)
    head = width * N_OUT + N_OUT
    assert model.count_params() == stem + depth * per_block + head
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == stem + depth * per_block + head


def test_prelu_adds_one_slope_per_unit():
    depth, width = 2, 8
    model = build("plain_mlp", depth=depth, width=width, activation="prelu")
    base = (N_IN * width + width) + (depth - 1) * (width * width + width) + (width * N_OUT + N_OUT)
    assert model.count_params() == base + depth * width
    alpha = model.get_layer("block_000_act").weights[0].numpy()
    np.testing.assert_array_equal(alpha, np.full_like(alpha, 0.25))


def test_float64_models_are_float64():
    model = build("resnet_mlp", depth=2, dtype="float64")
    assert {v.dtype for v in model.trainable_variables} == {"float64"}
    y = model(np.zeros((2, *INPUT_SHAPE)))
    assert np.asarray(y).dtype == np.float64


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("arch", ["plain_mlp", "resnet_mlp"])
def test_keras_round_trip_gives_identical_outputs(arch, tmp_path):
    import keras

    model = build(arch, depth=2, width=8, activation="leaky_relu", activation_options={"negative_slope": 0.2},
                  bias_init_std=0.1)
    x = np.random.RandomState(0).uniform(size=(5, *INPUT_SHAPE)).astype("float32")
    path = tmp_path / f"{arch}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert [b.prefix for b in zoo.blocks(loaded)] == [b.prefix for b in zoo.blocks(model)]
    assert loaded.get_layer("block_000_act").negative_slope == pytest.approx(0.2)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_source_read_signatures_match_the_imported_builders():
    """zoo.options reads builders from their source (no TensorFlow); it must equal what Python compiled."""
    import inspect

    from zoo.signatures import DATA_ARGS

    registry = zoo._load()
    assert registry.names() == zoo.names()
    for name in registry.names():
        sig = inspect.signature(registry.get(name))
        compiled = {p.name: (p.default, p.annotation) for p in sig.parameters.values()
                    if p.kind == p.KEYWORD_ONLY and p.name not in DATA_ARGS}
        assert zoo.options(name) == compiled, name
        assert zoo.family(name) == registry.meta(name)["family"] and zoo.paper(name) == registry.meta(name)["paper"]


def test_factories_take_no_option_they_would_ignore():
    from zoo.activations import make_activation
    from zoo.initializers import make_initializer

    with pytest.raises(TypeError):
        make_activation("relu", "block_000_act", negative_slope=0.1)
    with pytest.raises(TypeError):
        make_initializer("glorot_uniform", gain=5.0)
    assert make_initializer("orthogonal", gain=2.0).gain == 2.0
