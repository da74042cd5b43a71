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
from ablations.probe.discovery import discover
from ablations.probe import make_spec

L = keras.layers


# ----------------------------------------------------------------------------------------- reference tape


@contextlib.contextmanager
def eps_patch(tape: tf.GradientTape, targets: list[tuple[keras.layers.Layer, str, int]], eps: dict, seen: dict):
    """Wraps each ``(layer, where, i)``: ``where`` = "out" adds a watched zero tensor to the layer's first
    output, "in" to its ``i``-th input (in the list an Add layer takes, else the ``i``-th argument), and
    records the tensor's value in ``seen``.
    The first call of each layer only."""
    originals = {}
    for layer, _, _ in targets:
        if id(layer) in originals:
            continue
        originals[id(layer)] = orig = layer.call
        mine = [(w, j) for lay, w, j in targets if lay is layer]

        def add_eps(key, value):
            e = tf.zeros_like(value)
            tape.watch(e)
            eps[key], seen[key] = e, value.numpy()
            return value + e

        def call(*args, _orig=orig, _layer=layer, _mine=mine, **kwargs):
            args = list(args)
            for w, j in _mine:
                key = (id(_layer), w, j)
                if w == "in" and key not in eps:
                    if isinstance(args[0], (list, tuple)):  # Add()([a, b])
                        args[0] = [add_eps(key, a) if k == j else a for k, a in enumerate(args[0])]
                    else:  # one input, or an operation's positional inputs (a + b)
                        args[j] = add_eps(key, args[j])
            out = _orig(*args, **kwargs)
            key = (id(_layer), "out", 0)
            if ("out", 0) in _mine and key not in eps:
                flat = tree.flatten(out)
                first = add_eps(key, flat[0])
                out = first if len(flat) == 1 and not isinstance(out, (list, tuple, dict)) else \
                    tree.pack_sequence_as(out, [first, *flat[1:]])
            return out

        layer.call = call
    try:
        yield
    finally:
        for layer, _, _ in targets:
            if "call" in layer.__dict__:
                del layer.call


def reference(model, x, loss_fn, targets, training=False):
    """Values and dL/d(value) at each target of the original model, by the eps trick (one forward pass)."""
    eps: dict = {}
    seen: dict = {}
    with tf.GradientTape() as tape:
        with eps_patch(tape, targets, eps, seen):
            loss = loss_fn(model(x, training=training))
    keys = [(id(layer), where, i) for layer, where, i in targets]
    return [seen[k] for k in keys], [g.numpy() for g in tape.gradient(loss, [eps[k] for k in keys])]


def tap_values_and_grads(d, x, loss_fn, groups, training=False):
    """Values and gradients of the tap model's taps, group by group (one forward pass)."""
    with tf.GradientTape() as tape:
        flat, taps = d.split(d.tap_model(x, training=training))
        loss = loss_fn(d.pack_outputs(flat))
    tensors = [t for g in groups for t in taps[g]]
    grads = tape.gradient(loss, tensors)
    return [t.numpy() for t in tensors], [g.numpy() if g is not None else None for g in grads]


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


def _add_of(block):
    """The block's last 2-input Add (a layer, or the operation behind ``a + b``)."""
    from keras.src.ops.numpy import Add as AddOp

    return [op for op in block.layers.values() if isinstance(op, (L.Add, AddOp))][-1]


def check_taps(model, d, x, groups=("pre", "act_in"), loss_fn=None, training=False):
    """The discovered taps hold the same values as the original model's tensors at those points, and the
    gradient at ``pre`` (the one the probe differentiates) equals the eps reference."""
    loss_fn = loss_fn or mse_all()
    targets, what = [], []
    for group in groups:
        idx = d.taps[group]
        assert idx, group
        if group == "pre":
            targets += [(get(model, d.blocks[i].pre_layer), "out", 0) for i in idx]
        elif group == "act_in":
            targets += [(d.blocks[i].act, "in", 0) for i in idx]
        else:  # skip / branch: the inputs of the block's Add, in Keras' Add()([shortcut, x]) order
            targets += [(_add_of(d.blocks[i]), "in", 0 if group == "skip" else 1) for i in idx]
        what += [(group, i) for i in idx]
    got_v, got_g = tap_values_and_grads(d, x, loss_fn, groups, training)
    want_v, want_g = reference(model, x, loss_fn, targets, training)
    assert_close(got_v, want_v, f"values of {what}")
    pre = [k for k, (g, _) in enumerate(what) if g == "pre"]
    assert_close([got_g[k] for k in pre], [want_g[k] for k in pre], "dL/d(pre)")


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


def _zoo_reference(model):
    """The zoo convention read straight off the layer names (the probe's rule before discovery existed):
    rows as ``(depth, block, layer, param, role, size)`` and per block the tensors of each tap."""
    import numpy as np

    layer_of = {id(v): layer.name for layer in model.layers for v in layer.trainable_weights}
    rows = []
    for v in model.trainable_variables:
        name = layer_of[id(v)]
        role, depth = zoo.layer_role(name)
        parsed = zoo.parse_layer_name(name)
        rows.append(dict(depth=depth, block=name[: -len(parsed[1]) - 1] if parsed else name, layer=name,
                         param=v.name, role=role, size=int(np.prod(v.shape)), path=v.path))
    names = [(r["layer"], r["param"]) for r in rows]
    for r in rows:  # several tensors of one name in a layer: the path below the layer
        if names.count((r["layer"], r["param"])) > 1:
            r["param"] = r["path"].split("/", 1)[1]
    taps = []
    for b in zoo.blocks(model):
        add = b.layers.get("add")
        taps.append(dict(pre=b.linear.output if b.linear is not None else None,
                         act_input=b.act.input if b.act is not None else None,
                         skip=add.input[0] if add is not None else None, branch=add.input[1] if add is not None else None,
                         gate=b.layers["gate"].output if "gate" in b.layers else None))
    return [{k: v for k, v in r.items() if k != "path"} for r in rows], zoo.blocks(model), taps


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_models_give_exactly_the_zoo_convention(name):
    model = _zoo_small(name)
    d = discover(model)
    rows, blocks, taps = _zoo_reference(model)
    assert d.params_frame().to_dict("records") == rows
    assert [(b.index, b.name) for b in d.blocks] == [(b.index, b.prefix) for b in blocks]
    assert all(b.source == "zoo" for b in d.blocks)
    # The very same KerasTensors (no layer was called again).
    for view, want in zip(d.blocks, taps):
        for attr, tensor in want.items():
            assert getattr(view, attr) is tensor, (view.name, attr)
    assert [v.act for v in d.blocks] == [b.act for b in blocks]
    scalars = {}
    for b in blocks:
        for layer in b.layers.values():
            for w in layer.weights:
                if w.name in ("alpha", "active") and tuple(w.shape) == ():
                    scalars.setdefault((b.index, w.name), []).append(id(w))
    assert {(v.index, k): [id(w) for w in ws] for v in d.blocks for k, ws in v.scalars.items()} == scalars
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


# ----------------------------------------------------------------------------------------- keras.applications

IMG = (32, 32, 3)
# name -> (constructor, number of blocks, first, last, stem layers, tapped groups)
APPS = {
    "ResNet50": (keras.applications.ResNet50, 16, "conv2_block1", "conv5_block3", ["conv1_conv", "conv1_bn"],
                 ("pre", "act_in", "skip", "branch")),
    "DenseNet121": (keras.applications.DenseNet121, 6 + 12 + 24 + 16, "conv2_block1", "conv5_block16",
                    ["conv1_conv", "conv1_bn"], ("pre", "act_in")),
    "MobileNetV2": (keras.applications.MobileNetV2, 17, "expanded_conv", "block_16", ["Conv1", "bn_Conv1"],
                    ("pre", "act_in", "skip", "branch")),
    "VGG16": (keras.applications.VGG16, 5, "block1", "block5", [], ("pre",)),
}


def _images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, *IMG)).astype("float32")


@pytest.mark.parametrize("app", list(APPS))
def test_keras_applications_blocks_in_depth_order_and_gradients_at_taps(app):
    ctor, n, first, last, stem, groups = APPS[app]
    keras.utils.set_random_seed(0)
    model = ctor(weights=None, input_shape=IMG, classes=4)
    d = discover(model)
    names = [b.name for b in d.blocks]
    assert len(names) == n and names[0] == first and names[-1] == last, names
    assert all(b.source == "names" for b in d.blocks)
    assert sorted({p.layer for p in d.params if p.role == "stem"}) == sorted(stem)
    assert {p.layer for p in d.params if p.role == "head"} >= {"predictions"}
    check_rows_unique_and_complete(model, d)
    assert not any("no blocks" in note for note in d.notes)
    check_taps(model, d, _images(), groups)
    if app == "ResNet50":  # the residual branch, not the projection shortcut, holds pre; Keras adds [shortcut, x]
        b = d.blocks[0]
        assert b.pre_layer == "conv2_block1_1_conv" and b.act.name == "conv2_block1_1_relu"
        assert b.skip is b.layers["add"].input[0] and b.branch is b.layers["add"].input[1]
        assert {p.layer for p in d.params if p.block == "conv2_block1"} >= {"conv2_block1_0_conv", "conv2_block1_3_bn"}
    if app == "DenseNet121":  # transitions sit between dense blocks
        transitions = {f"pool{i}_{k}" for i in (2, 3, 4) for k in ("bn", "conv")}
        assert {p.layer for p in d.params if p.role == "other"} == transitions
    if app == "VGG16":  # Conv2D(activation="relu"): the gradient is taken at the post-activation output
        assert all(b.pre_fused and b.pre_kind == "fused" for b in d.blocks)
        assert any("fused activation" in note for note in d.notes)


def test_keras_application_under_a_new_head_is_opened_and_tapped_with_shared_weights():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, input_shape=IMG, include_top=False, alpha=0.35)
    x = keras.Input(IMG)
    y = L.Dense(3, name="new_head")(L.GlobalAveragePooling2D()(base(x, training=False)))  # Keras' fine-tuning idiom
    model = keras.Model(x, y, name="transfer")
    n_vars = len(model.trainable_variables)
    d = discover(model)
    assert len(model.trainable_variables) == n_vars  # nothing copied
    names = [b.name for b in d.blocks]
    assert len(names) == 17 and names[0] == f"{base.name}/expanded_conv" and names[-1] == f"{base.name}/block_16"
    heads = {f"{base.name}/Conv_1", f"{base.name}/Conv_1_bn", "new_head"}
    assert {p.layer for p in d.params if p.role == "head"} == heads
    check_rows_unique_and_complete(model, d)
    xs = _images()
    for training in (False, True, None):  # BatchNorm: the flattened layers see the same training flag
        np.testing.assert_allclose(d.split(d.tap_model(xs, training=training))[0][0], model(xs, training=training),
                                   rtol=1e-5, atol=1e-6)
    check_taps(model, d, xs, ("pre", "skip"))


# ----------------------------------------------------------------------------------------- Sequential, RNN


def _x(shape, n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def test_sequential_sigmoid_mlp_with_fused_activations_is_eight_blocks_tapped_at_layer_outputs():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,))] + [L.Dense(16, activation="sigmoid") for _ in range(8)]
                             + [L.Dense(4, name="out")], name="sigmoid8")
    d = discover(model)
    assert len(d.blocks) == 8 and all(b.pre_fused and b.pre_kind == "fused" and b.source == "graph" for b in d.blocks)
    assert [b.pre_layer for b in d.blocks] == [layer.name for layer in model.layers[:8]]
    assert [p.role for p in d.params] == ["block"] * 16 + ["head"] * 2
    assert [p.depth for p in d.params[:16:2]] == list(range(8))
    assert any("fused activation" in note for note in d.notes)
    xs = _x((16,))
    check_taps(model, d, xs, ("pre",))
    # dL/d(output) of sigmoid layers: the vanishing shows at the taps, a factor of ~4 or more per layer.
    _, grads = tap_values_and_grads(d, xs, mse_all(), ["pre"])
    norms = [np.linalg.norm(g) for g in grads]
    assert norms[0] < norms[-1] * 1e-2, norms


def test_sequential_with_separate_activation_layers_taps_the_pre_activation():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,))] + sum([[L.Dense(8), L.Activation("tanh")] for _ in range(3)], [])
                             + [L.Dense(3), L.Softmax()], name="unfused")
    d = discover(model)
    assert len(d.blocks) == 3 and all(b.pre_kind == "pre_activation" and not b.pre_fused for b in d.blocks)
    assert [b.act.name for b in d.blocks] == [model.layers[i].name for i in (1, 3, 5)]
    assert all(b.act_input is b.pre for b in d.blocks)  # Dense output -> Activation input
    check_taps(model, d, _x((8,)), ("pre", "act_in"))


def test_functional_lstm_blocks_are_the_recurrent_layers():
    keras.utils.set_random_seed(0)
    x = keras.Input((7, 3))
    h = L.LSTM(5, return_sequences=True, name="lstm_a")(x)
    h = L.LSTM(5, name="lstm_b")(h)
    model = keras.Model(x, L.Dense(2, name="out")(h), name="lstm_net")
    d = discover(model)
    assert [b.name for b in d.blocks] == ["lstm_a", "lstm_b"]
    assert [b.recurrent.name for b in d.blocks] == ["lstm_a", "lstm_b"] and all(b.pre_kind == "fused" for b in d.blocks)
    assert [(p.layer, p.param) for p in d.params[:3]] == [("lstm_a", "kernel"), ("lstm_a", "recurrent_kernel"),
                                                          ("lstm_a", "bias")]
    check_rows_unique_and_complete(model, d)
    check_taps(model, d, _x((7, 3)), ("pre",))


def test_residual_model_with_default_names_is_grouped_by_its_add_nodes():
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same")(x)
    for _ in range(3):
        b = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(h)))
        h = L.ReLU()(L.Add()([h, L.Conv2D(4, 3, padding="same")(b)]))
    h = h + L.Dense(4)(h)  # a residual written with `+`
    model = keras.Model(x, L.Dense(2)(L.GlobalAveragePooling2D()(h)), name="plain_names")
    d = discover(model)
    assert len(d.blocks) == 4 and all(b.source == "graph" and b.skip is not None for b in d.blocks)
    assert [p.role for p in d.params][:2] == ["stem", "stem"] and [p.role for p in d.params][-2:] == ["head", "head"]
    check_rows_unique_and_complete(model, d)
    assert d.blocks[-1].pre_layer.startswith("dense")  # the branch of `h + Dense(h)`
    check_taps(model, d, _x((8, 8, 2)), ("pre", "act_in", "skip", "branch"))


def test_named_blocks_take_in_their_unnamed_shortcut_and_activation():
    """Xception / ConvNeXt / MobileNetV3 style: the block's own layers are named, Keras left the projection
    shortcut, the Add and a ReLU with automatic names."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", name="stem_conv")(x)
    for i in (1, 2):
        b = L.Conv2D(8, 3, padding="same", name=f"block{i}_conv1")(h)
        b = L.ReLU()(L.BatchNormalization(name=f"block{i}_bn1")(b))  # unnamed activation
        b = L.Conv2D(8, 3, padding="same", name=f"block{i}_conv2")(b)
        h = L.Add()([L.Conv2D(8, 1)(h), b])  # unnamed projection shortcut and Add
    model = keras.Model(x, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(h)), name="xception_like")
    d = discover(model)
    assert [b.name for b in d.blocks] == ["block1", "block2"]
    assert all(b.act is not None and b.skip is not None for b in d.blocks)
    assert [p.role for p in d.params].count("other") == 0
    assert [b.pre_layer for b in d.blocks] == ["block1_conv1", "block2_conv1"]  # the branch, not the shortcut
    check_taps(model, d, _x((8, 8, 2)), ("pre", "act_in", "skip", "branch"))


# ----------------------------------------------------------------------------------------- no graph, outputs


class Net(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.body = L.Dense(6, activation="relu", name="body")
        self.attn = L.MultiHeadAttention(2, 3, name="attn")
        self.out = L.Dense(2, name="out")

    def call(self, x):
        h = self.body(x)
        return {"y": self.out(self.attn(h[:, None], h[:, None])[:, 0]), "hidden": h}


def test_subclassed_model_gets_rows_and_a_note_never_a_traceback():
    keras.utils.set_random_seed(0)
    model = Net()
    xs = _x((5,))
    model(xs)
    d = discover(model)
    assert d.blocks == [] and len(d.notes) == 1 and "functional API" in d.notes[0]
    assert all(p.role == "other" and p.depth == -1 for p in d.params)
    check_rows_unique_and_complete(model, d)
    rows = [(p.layer, p.param) for p in d.params]
    assert rows[:2] == [("body", "kernel"), ("body", "bias")] and rows[-2:] == [("out", "kernel"), ("out", "bias")]
    assert ("attn", "query/kernel") in rows and ("attn", "attention_output/bias") in rows
    # The per-tensor statistics need no taps: the rows line up with the gradients of a plain tape.
    with tf.GradientTape() as tape:
        flat, taps = d.split(d.tap_model(xs))
        outputs = d.pack_outputs(flat)
        loss = mse_all()(outputs)
    assert set(outputs) == {"y", "hidden"} and not any(taps.values())  # its own output structure, whole
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    spec = make_spec(model)  # the probe's spec of a subclassed model: rows and the note, no traceback
    assert not spec.graph and len(spec.params) == len(d.params) and spec.notes == d.notes


def test_model_without_blocks_says_so_and_what_to_do():
    x = keras.Input((4,))
    d = discover(keras.Model(x, L.Dense(2, name="only")(x), name="logreg"))
    assert d.blocks == [] and [p.role for p in d.params] == ["other", "other"]
    assert any("no blocks found" in n and "block_<i>_<part>" in n for n in d.notes)
    unbuilt = keras.Sequential([L.Dense(3)])
    d = discover(unbuilt)
    assert d.blocks == [] and "keras.Input" in d.notes[0]


def test_multi_output_model_keeps_every_output_and_the_compiled_loss_maps_them_by_name():
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    h = L.Activation("tanh", name="act1")(L.Dense(8, name="trunk1")(x))
    h = L.Activation("tanh", name="act2")(L.Dense(8, name="trunk2")(h))
    model = keras.Model(x, {"cls": L.Dense(3, name="cls")(h), "reg": L.Dense(1, name="reg")(h)}, name="two_heads")
    model.compile(loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
                  loss_weights={"cls": 1.0, "reg": 0.5})
    d = discover(model)
    assert d.n_outputs == 2 and d.output_names == ["cls", "reg"] and len(d.blocks) == 2
    assert {p.layer for p in d.params if p.role == "head"} == {"cls", "reg"}
    assert any("2 outputs" in n for n in d.notes)
    xs, y = _x((6,)), {"cls": np.array([0, 1, 2, 0]), "reg": _x((1,), seed=1)}

    def compiled(outputs):  # the model's own compiled loss over all outputs
        return model.compute_loss(x=xs, y=y, y_pred=outputs)

    packed = d.pack_outputs(d.split(d.tap_model(xs))[0])
    assert set(packed) == {"cls", "reg"}
    np.testing.assert_allclose(compiled(packed), compiled(model(xs)), rtol=1e-6)
    check_taps(model, d, xs, ("pre", "act_in"), loss_fn=compiled)
    # A wrapper returning the packed structure (what a probe's train_step does) compiles and fits with the
    # same per-output losses as the model itself.
    wrapper = _Wrapper(d)
    wrapper.compile(loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
                    loss_weights={"cls": 1.0, "reg": 0.5})
    np.testing.assert_allclose(wrapper.compute_loss(x=xs, y=y, y_pred=wrapper(xs)), compiled(model(xs)), rtol=1e-6)


class _Wrapper(keras.Model):
    def __init__(self, d):
        super().__init__()
        self.tap = d.tap_model
        self.output_names = d.output_names  # what a loss dict is matched against for list outputs
        object.__setattr__(self, "d", d)

    def call(self, x, training=False):
        return self.d.pack_outputs(self.d.split(self.tap(x, training=training))[0])


# ----------------------------------------------------------------------------------------- keras-hub

hub = pytest.mark.skipif(importlib.util.find_spec("keras_hub") is None,
                         reason="keras-hub not installed (optional extra: pip install .[hub])")
TINY = dict(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128, max_sequence_length=16)


def _tokens(n=2, t=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), "int32")
    mask[0, t // 2:] = 0  # padding that the attention must skip: the mask reaches the flattened layers
    return {"token_ids": rng.integers(1, 50, (n, t)).astype("int32"), "padding_mask": mask}


@hub
@pytest.mark.parametrize("arch", ["BertBackbone", "GPT2Backbone"])
def test_keras_hub_backbones_are_blocks_of_transformer_layers_tapped_at_their_outputs(arch):
    import keras_hub

    keras.utils.set_random_seed(0)
    model = getattr(keras_hub.models, arch)(**TINY)
    d = discover(model)
    assert [b.name for b in d.blocks] == ["transformer_layer_0", "transformer_layer_1"]
    assert all(b.pre_kind == "block_output" and b.pre_fused for b in d.blocks)
    assert {p.layer for p in d.params if p.role == "stem"} >= {"token_embedding", "position_embedding"}
    check_rows_unique_and_complete(model, d)
    rows = {(p.layer, p.param) for p in d.params}
    attn = "self_attention_layer" if arch == "BertBackbone" else "self_attention"  # keras-hub's sublayer names
    assert (f"transformer_layer_0/{attn}", "query/kernel") in rows
    assert d.n_outputs == len(model.outputs)
    feed = _tokens()
    if arch == "BertBackbone":
        feed["segment_ids"] = np.zeros_like(feed["token_ids"])
    check_taps(model, d, feed, ("pre",))


@hub
def test_keras_hub_backbone_under_a_head_is_opened_with_unique_rows():
    import keras_hub

    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(**TINY, name="bert_backbone")  # auto-names count up across tests
    inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
    model = keras.Model(inputs, L.Dense(3, name="cls_head")(bert(inputs)["pooled_output"]), name="bert_cls")
    d = discover(model)
    assert [b.name for b in d.blocks] == ["bert_backbone/transformer_layer_0", "bert_backbone/transformer_layer_1"]
    check_rows_unique_and_complete(model, d)
    assert ("bert_backbone/transformer_layer_1/feedforward_output_dense", "kernel") in {(p.layer, p.param)
                                                                                        for p in d.params}
    assert {p.layer for p in d.params if p.role == "head"} == {"bert_backbone/pooled_dense", "cls_head"}
    feed = {**_tokens(), "segment_ids": np.zeros((2, 8), "int32")}
    np.testing.assert_allclose(d.split(d.tap_model(feed))[0][0], model(feed), rtol=1e-5, atol=1e-6)
    check_taps(model, d, feed, ("pre",))
