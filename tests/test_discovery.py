"""Block discovery (ablations.discovery) on zoo models, keras.applications, Sequential, recurrent, nested,
subclassed, multi-output models and keras-hub backbones.

Gradients at the discovered tap points are checked against an independent computation on the ORIGINAL
model: each tapped layer's call is wrapped to add a zero tensor ``eps`` to its output (or input) and a
plain ``tf.GradientTape`` over ``model(x)`` gives dL/d(eps) = dL/d(that tensor). The tap model, its
flattened graph and the tensors discovery picked play no part in it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import tree

import zoo
from ablations.discovery import discover
from ablations.probe import make_spec

L = keras.layers


# ----------------------------------------------------------------------------------------- reference tape


@contextlib.contextmanager
def eps_patch(tape: tf.GradientTape, targets: list[tuple[keras.layers.Layer, str, int]], eps: dict):
    """Wraps each ``(layer, where, i)``: ``where`` = "out" adds a watched zero tensor to the layer's first
    output, "in" to its ``i``-th input (Add layers take a list). The first call of each layer only."""
    originals = {}
    for layer, where, i in targets:
        if id(layer) in originals:
            continue
        orig = originals[id(layer)] = layer.call
        mine = [(w, j) for lay, w, j in targets if lay is layer]

        def call(*args, _orig=orig, _layer=layer, _mine=mine, **kwargs):
            args = list(args)
            for w, j in _mine:
                key = (id(_layer), w, j)
                if w == "in" and key not in eps:
                    x = args[0][j] if isinstance(args[0], (list, tuple)) else args[0]
                    e = tf.zeros_like(x)
                    tape.watch(e)
                    eps[key] = e
                    if isinstance(args[0], (list, tuple)):
                        args[0] = [a + e if k == j else a for k, a in enumerate(args[0])]
                    else:
                        args[0] = x + e
            out = _orig(*args, **kwargs)
            key = (id(_layer), "out", 0)
            if any(w == "out" for w, _ in _mine) and key not in eps:
                first = tree.flatten(out)[0]
                e = tf.zeros_like(first)
                tape.watch(e)
                eps[key] = e
                out = first + e if not isinstance(out, (list, tuple, dict)) else \
                    tree.pack_sequence_as(out, [first + e, *tree.flatten(out)[1:]])
            return out

        layer.call = call
    try:
        yield
    finally:
        for layer, _, _ in targets:
            if "call" in layer.__dict__:
                del layer.call


def reference_grads(model, x, loss_fn, targets, training=False):
    """dL/d(tensor) at each target of the original model, by the eps trick (one forward pass)."""
    eps: dict = {}
    with tf.GradientTape() as tape:
        with eps_patch(tape, targets, eps):
            loss = loss_fn(model(x, training=training))
    keys = [(id(layer), where, i) for layer, where, i in targets]
    return [g.numpy() for g in tape.gradient(loss, [eps[k] for k in keys])]


def tap_grads(d, x, loss_fn, group, training=False):
    with tf.GradientTape() as tape:
        flat, taps = d.split(d.tap_model(x, training=training))
        loss = loss_fn(d.pack_outputs(flat))
    return [g.numpy() for g in tape.gradient(loss, taps[group])]


def mse_all(seed=0):
    """Loss over every output: mean squared distance to fixed random targets (so no gradient is trivial)."""
    cache = {}

    def loss(outputs):
        total = 0.0
        for i, o in enumerate(tree.flatten(outputs)):
            if i not in cache:
                cache[i] = tf.constant(np.random.default_rng(seed + i).normal(size=o.shape).astype("float32"))
            total += tf.reduce_mean(tf.square(tf.cast(o, tf.float32) - cache[i]))
        return total

    return loss


def assert_close(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        scale = float(np.max(np.abs(w)))
        assert scale > 0, (what, i, "reference gradient is zero: the test would prove nothing")
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{what} block {i}")


def get(model, path):
    """A layer by its nested path (``resnet50/conv2_block1_1_conv``)."""
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name) if hasattr(layer, "get_layer") else getattr(layer, name)
    return layer


def check_rows_unique_and_complete(model, d):
    assert len(d.params) == len(model.trainable_variables)
    keys = [(p.layer, p.param) for p in d.params]
    assert len(set(keys)) == len(keys), [k for k, n in collections.Counter(keys).items() if n > 1]
    assert [p.size for p in d.params] == [int(np.prod(v.shape)) for v in model.trainable_variables]
    assert [b.index for b in d.blocks] == list(range(len(d.blocks)))
    for p in d.params:
        assert (p.role == "block") == (p.depth >= 0)
        if p.role == "block":
            assert d.blocks[p.depth].name == p.block


def check_taps(model, d, x, groups=("pre", "act_in"), loss_fn=None, training=False):
    """Gradients at the discovered taps equal the eps reference on the original model, for each group."""
    loss_fn = loss_fn or mse_all()
    for group in groups:
        idx = d.taps[group]
        if group == "pre":
            targets = [(get(model, d.blocks[i].pre_layer), "out", 0) for i in idx]
        elif group == "act_in":
            targets = [(d.blocks[i].act, "in", 0) for i in idx]
        else:  # skip / branch: the inputs of the block's Add, in Keras' Add()([shortcut, x]) order
            targets = [(d.blocks[i].layers["add"], "in", 0 if group == "skip" else 1) for i in idx]
        assert targets, group
        assert_close(tap_grads(d, x, loss_fn, group, training), reference_grads(model, x, loss_fn, targets, training),
                     group)


# ----------------------------------------------------------------------------------------- zoo: unchanged


def _zoo_small(name):
    fam = zoo.family(name)
    shape = (6, 3) if fam in ("rnn", "transformer") else (8, 8, 1)
    opts, kw = zoo.options(name), {"depth": 2}
    for key, value in (("width", 4), ("units", 4), ("growth_rate", 2), ("alpha_init", 0.1)):
        if key in opts:
            kw[key] = value
    if "d_model" in opts:
        kw.update(d_model=8, heads=2)
    keras.utils.set_random_seed(0)
    return zoo.build(name, input_shape=shape, num_outputs=3, **kw)


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_models_give_exactly_make_spec(name):
    model = _zoo_small(name)
    d, spec = discover(model), make_spec(model)
    assert d.params_frame().to_dict("records") == spec.params.to_dict("records")
    assert [(b.index, b.name) for b in d.blocks] == list(zip(spec.blocks["depth"], spec.blocks["block"]))
    assert all(b.source == "zoo" for b in d.blocks)
    # The very same KerasTensors, in the same order and groups (no layer was called again).
    assert len(d.tap_model.outputs) == len(spec.tap_model.outputs)
    assert all(a is b for a, b in zip(d.tap_model.outputs, spec.tap_model.outputs))
    assert {k: len(v) for k, v in d.taps.items()} == {k: b - a for k, (a, b) in spec.groups.items()}
    assert d.taps["pre"] == spec.pre_rows and d.taps["act_in"] == spec.act_rows
    assert d.taps["skip"] == spec.res_rows and d.taps["gate"] == spec.gate_rows
    assert [d.blocks[i].act for i in d.taps["act_in"]] == spec.act_layers
    assert {k: [(r, id(v)) for r, v in rows] for k, rows in spec.scalars.items()} == \
        {k: [(b.index, id(b.scalars[k])) for b in d.blocks if k in b.scalars] for k in spec.scalars}
    check_rows_unique_and_complete(model, d)


def test_zoo_model_nested_in_a_user_model_keeps_its_blocks(tmp_path):
    keras.utils.set_random_seed(1)
    inner = zoo.build("plain_mlp", input_shape=(8,), num_outputs=3, depth=4, width=6, activation="tanh")
    x = keras.Input((8,))
    y = L.Dense(2, name="user_head")(inner(L.Dense(8, name="user_stem")(x)))
    model = keras.Model(x, y, name="user")
    d = discover(model)
    assert [b.name for b in d.blocks] == [f"plain_mlp/block_00{i}" for i in range(4)]
    rows = {(p.layer, p.param): p for p in d.params}
    assert rows[("plain_mlp/block_000_linear", "kernel")].depth == 0
    assert rows[("plain_mlp/block_003_linear", "bias")].block == "plain_mlp/block_003"
    assert rows[("user_stem", "kernel")].role == "stem" and rows[("user_head", "kernel")].role == "head"
    assert rows[("plain_mlp/head_linear", "kernel")].role == "head"
    check_rows_unique_and_complete(model, d)
    assert any("opened nested models plain_mlp" in n for n in d.notes)
    xs = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    np.testing.assert_allclose(d.split(d.tap_model(xs))[0][0], model(xs), rtol=1e-6)
    check_taps(model, d, xs)
    model.save(tmp_path / "user.keras")  # opening the nested model left the user's model intact
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "user.keras")(xs), model(xs), rtol=1e-6)
