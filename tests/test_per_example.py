"""Per-example gradient norms from one backward pass equal a loop of per-example tapes; noise statistics match NumPy.

Every model is tiny (a few hundred to a few thousand weights, batches of 6-8): the reference is one tape per
example, so the test's cost is that loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import keras

import zoo
from ablations.instruments import per_example as pe

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(shape, n_classes, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype("float32")
    return tf.constant(x), tf.constant(rng.integers(0, n_classes, batch))


def _loss(model, x, y, training=False):
    return LOSS(y, model(x, training=training))


def _batch(x):
    return int(tf.nest.flatten(x)[0].shape[0])


def reference_norms(model, layers, x, y, variables=None):
    """{variable path: [B] ||grad l_i||} from one tape per example, and the flattened per-example gradients."""
    variables = variables or [w for layer in layers for w in pe.layer_variables(layer)]
    norms, flat = {v.path: [] for v in variables}, []
    for i in range(_batch(x)):
        with tf.GradientTape() as tape:
            loss = _loss(model, tf.nest.map_structure(lambda t: t[i:i + 1], x), y[i:i + 1])
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]  # Embedding: IndexedSlices
        for v, g in zip(variables, grads):
            norms[v.path].append(float(tf.norm(tf.cast(g, tf.float64))))
        flat.append(np.concatenate([np.ravel(g.numpy()).astype(np.float64) for g in grads]))
    return {k: np.array(v) for k, v in norms.items()}, np.stack(flat)


def taps_of(model, layers, x, y, sublayers=()):
    """One forward/backward pass: (loss, [(layer, input, dL/d output)]) with L the batch-mean loss."""
    tap = keras.Model(model.inputs, [model.outputs[0], *[l.input for l in layers], *[l.output for l in layers]])
    with tf.GradientTape() as tape, pe.record_io(sublayers) as calls:
        outs = tap(x, training=False)
        loss = LOSS(y, outs[0])
        k = len(layers)
        ins, outputs = outs[1:1 + k], outs[1 + k:]
        sub_in = [calls[id(s)][0][0] for s in sublayers]
        sub_out = [calls[id(s)][0][1] for s in sublayers]
    grads = tape.gradient(loss, list(outputs) + sub_out)
    pairs = list(zip(layers, ins, grads[:k])) + list(zip(sublayers, sub_in, grads[k:]))
    return loss, pairs


def our_norms(pairs, batch, method=None):
    out = {}
    for layer, a, g in pairs:
        for v, sq in pe.layer_sq_norms(layer, a, g, method):
            out[v.path] = batch * np.sqrt(sq.numpy().astype(np.float64))
    return out


def _assert_close(ours, ref, what=""):
    """Relative error < RTOL per example, except for gradients that are zero in exact arithmetic (attention's
    key bias: softmax ignores a shift shared by all keys), where both sides must be float32 noise."""
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    scale = max(float(np.max(v)) for v in ref.values())
    for k in ref:
        if np.max(ref[k]) < 1e-6 * scale:
            assert np.max(ours[k]) < 1e-6 * scale, (k, ours[k], ref[k])
            continue
        err = np.max(np.abs(ours[k] - ref[k]) / np.maximum(np.abs(ref[k]), 1e-30))
        assert err < RTOL, f"{what} {k}: relative error {err:.2e}\nours {ours[k]}\nref  {ref[k]}"


def _linear_layers(model):
    return [l for l in model.layers if type(l).__name__ in ("Dense", "EinsumDense", "Conv1D", "Conv2D",
                                                             "DepthwiseConv1D", "DepthwiseConv2D",
                                                             "LayerNormalization", "Embedding")]


def _check_model(model, x, y, sublayers=(), methods=(None,)):
    layers = _linear_layers(model)
    ref, _ = reference_norms(model, layers + list(sublayers), x, y)
    _, pairs = taps_of(model, layers, x, y, sublayers)
    for method in methods:
        _assert_close(our_norms(pairs, _batch(x), method), ref, what=f"method={method}")
    return pairs


# ------------------------------------------------------------------------------------------- exactness


def test_zoo_mlp_matches_per_example_tapes():
    keras.utils.set_random_seed(1)
    model = zoo.build("plain_mlp", input_shape=(64,), num_outputs=10, depth=3, width=16)
    x, y = _data((64,), 10)
    _check_model(model, x, y)


@pytest.mark.parametrize("arch,opts", [("plain_cnn", {}), ("resnet_cnn", {"shortcut": "B"})])
def test_zoo_cnn_matches_per_example_tapes(arch, opts):
    """3x3 'same' convs at stride 1 and 2 (asymmetric padding on 8x8), a strided 1x1 projection, the head;
    BatchNorm in inference mode (in training mode it couples the examples)."""
    keras.utils.set_random_seed(2)
    model = zoo.build(arch, input_shape=(8, 8, 1), num_outputs=10, depth=3, width=4, **opts)
    x, y = _data((8, 8, 1), 10, batch=6)
    _check_model(model, x, y, methods=(None, pe.GRAM, pe.EXPLICIT))


def test_zoo_transformer_attention_and_ffn_match_per_example_tapes():
    """EinsumDense query/key/value (abc,cde->abde) and output (abcd,cde->abe) projections inside
    MultiHeadAttention, the stem and FFN Dense on [B, T, d], the LayerNorms, the head on the pooled [B, d];
    Gram and explicit. Every trainable tensor of the model is covered (sinusoidal positions have none)."""
    keras.utils.set_random_seed(3)
    model = zoo.build("transformer", input_shape=(6, 5), num_outputs=4, depth=2, d_model=8, heads=2)
    x, y = _data((6, 5), 4, batch=6)
    subs = [s for l in model.layers if isinstance(l, keras.layers.MultiHeadAttention)
            for s in pe.attention_projections(l)]
    assert len(subs) == 8
    pairs = _check_model(model, x, y, sublayers=subs, methods=(None, pe.GRAM, pe.EXPLICIT))
    covered = {id(v) for l, _, _ in pairs for v in pe.layer_variables(l)}
    assert all(id(v) in covered for v in model.trainable_variables)


def test_token_transformer_embedding_and_pre_ln():
    """Token inputs (Embedding rows shared by repeated tokens), Pre-LN with the final head_norm."""
    keras.utils.set_random_seed(12)
    model = zoo.build("transformer", input_shape=(7,), num_outputs=5, depth=1, d_model=8, heads=2,
                      norm_position="pre", vocab_size=4)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.integers(0, 4, (6, 7)), tf.int32)  # 7 tokens from 4: repeats in every example
    y = tf.constant(rng.integers(0, 5, 6))
    subs = [s for l in model.layers if isinstance(l, keras.layers.MultiHeadAttention)
            for s in pe.attention_projections(l)]
    pairs = _check_model(model, x, y, sublayers=subs)
    assert {"stem_embed", "head_norm", "block_000_norm1"} <= {l.name for l, _, _ in pairs}


@pytest.mark.parametrize("arch,output", [("simple_rnn", "sequence"), ("lstm", "last")])
def test_rnn_dense_layers_match_per_example_tapes(arch, output):
    """The head Dense of a recurrent zoo model on every time step ([B, T, units]) and on the last state."""
    keras.utils.set_random_seed(4)
    model = zoo.build(arch, input_shape=(5, 3), num_outputs=4, units=6, output=output)
    x, _ = _data((5, 3), 4, batch=6)
    y = tf.constant(np.random.default_rng(0).integers(0, 4, (6, 5) if output == "sequence" else (6,)))
    layers = _linear_layers(model)
    assert [l.name for l in layers] == ["head_linear"]
    assert pe.unsupported_reason(model.get_layer("block_000_rnn")) is not None
    _check_model(model, x, y, methods=(None, pe.GRAM, pe.EXPLICIT))


def _gru_reset_before() -> keras.Model:
    """Two GRUs in Keras' other form (reset gate applied before the recurrent product, one bias row)."""
    x = keras.Input((5, 3))
    h = keras.layers.GRU(6, reset_after=False, return_sequences=True, name="block_000_rnn")(x)
    h = keras.layers.GRU(6, reset_after=False, name="block_001_rnn")(h)
    return keras.Model(x, keras.layers.Dense(4, name="head_linear")(h))


@pytest.mark.parametrize("arch", ["simple_rnn", "lstm", "gru", "gru/reset_before"])
def test_recurrent_kernels_from_through_time_gradients(arch):
    """SimpleRNN / LSTM / GRU kernel, recurrent kernel and bias of a 2-layer stack, from the through-time
    probe's total dL/dh_t (zero eps added to h_t inside the cell) and each layer's input sequence (LSTM: its
    dL/dc_t by a backward scan; GRU: its gates from h_t alone), against a tape per example."""
    from ablations.instruments._rnn_views import time_grads, time_probe_view

    keras.utils.set_random_seed(10)
    model = (_gru_reset_before() if arch == "gru/reset_before" else
             zoo.build(arch, input_shape=(5, 3), num_outputs=4, units=6, depth=2))
    x, y = _data((5, 3), 4, batch=6)
    rnns = [model.get_layer("block_000_rnn"), model.get_layer("block_001_rnn")]
    variables = [w for l in rnns for w in l.cell.trainable_weights]
    ref, _ = reference_norms(model, [], x, y, variables=variables)
    _, dh = time_grads(time_probe_view(model), x, y, lambda yt, yp: LOSS(yt, yp))
    ins = keras.Model(model.inputs, [l.input for l in rnns])(x)
    for method in (None, pe.GRAM, pe.EXPLICIT):
        ours = {v.path: 6 * np.sqrt(sq.numpy().astype(np.float64))
                for l, a, g in zip(rnns, ins, dh)
                for v, sq in pe.RECURRENT_RULES[type(l.cell).__name__](l, a, g, method)}
        _assert_close(ours, ref, what=f"method={method}")


def test_conv_variants_match_per_example_tapes():
    """Conv1D causal + dilated, Conv1D strided valid, Conv2D grouped + dilated, Conv2D strided valid, a
    depthwise conv with multiplier 2 and stride 2, and an EinsumDense with a per-head (group) letter.
    (channels_first is transposed to channels_last first; TensorFlow's CPU conv has no NCHW kernel to test it.)"""
    keras.utils.set_random_seed(5)
    L = keras.layers
    seq = keras.Input((9, 4))
    s = L.Conv1D(4, 3, padding="causal", dilation_rate=2, name="c1_causal")(seq)
    s = L.Conv1D(6, 2, strides=2, padding="valid", name="c1_stride")(s)
    s = L.Reshape((4, 3, 2))(L.Dense(24, name="d_seq")(L.Flatten()(s)))  # [B, 4, heads 3, 2]
    s = L.EinsumDense("bthd,hde->bthe", output_shape=(4, 3, 5), bias_axes="he", name="per_head")(s)
    img = keras.Input((7, 7, 4))
    i = L.Conv2D(6, 3, padding="same", dilation_rate=2, groups=2, name="c2_group")(img)
    i = L.Conv2D(4, 3, strides=2, padding="valid", name="c2_stride")(i)
    i = L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, name="dw")(i)
    h = L.Concatenate()([L.Flatten()(s), L.Flatten()(i)])
    model = keras.Model([seq, img], L.Dense(3, name="out")(h))
    rng = np.random.default_rng(6)
    x = [tf.constant(rng.normal(size=(5, 9, 4)), tf.float32), tf.constant(rng.normal(size=(5, 7, 7, 4)), tf.float32)]
    y = tf.constant(rng.integers(0, 3, (5,)))
    pairs = _check_model(model, x, y, methods=(None, pe.GRAM, pe.EXPLICIT))
    assert {l.name for l, _, _ in pairs} >= {"c1_causal", "per_head", "dw", "c2_group"}


def test_method_choice_by_static_cost():
    assert pe.choose_method(1, 100, 100) == pe.OUTER
    assert pe.choose_method(8, 64, 64) == pe.GRAM  # 8 * 128 < 4096
    assert pe.choose_method(64, 27, 16) == pe.EXPLICIT  # a 3x3x3 -> 16 conv on 8x8: 64 * 43 > 432
    assert pe.choose_method(None, 64, 64) == pe.EXPLICIT


def test_plan_lists_what_is_covered():
    keras.utils.set_random_seed(11)
    model = zoo.build("transformer", input_shape=(6, 5), num_outputs=4, depth=1, d_model=8, heads=2)
    p = pe.plan(model)
    assert [l.name for l in p["layers"]] == ["stem_linear", "block_000_norm1", "block_000_linear",
                                             "block_000_linear2", "block_000_norm2", "head_linear"]
    assert len(p["sublayers"]) == 4 and not p["rnn"]
    assert not p["unsupported"]
    covered = {id(v) for v in p["variables"]}
    assert all(id(v) in covered for v in model.trainable_variables)
    cnn = pe.plan(zoo.build("resnet_cnn", input_shape=(8, 8, 1), num_outputs=3, depth=3, width=4))
    assert cnn["unsupported"] and all("BatchNormalization" in r for r in cnn["unsupported"].values())
    rnn = pe.plan(zoo.build("simple_rnn", input_shape=(5, 3), num_outputs=4, units=6))
    assert [l.name for l in rnn["rnn"]] == ["block_000_rnn"] and not rnn["unsupported"]


def test_unsupported_layers_say_why():
    assert "fused activation" in pe.unsupported_reason(keras.layers.Dense(3, activation="relu"))
    assert pe.unsupported_reason(keras.layers.Dense(3)) is None
    assert "every time step" in pe.unsupported_reason(keras.layers.LSTM(3))
    assert "every time step" in pe.unsupported_reason(keras.layers.GRU(3))


# ------------------------------------------------------------------------------------------ statistics


def test_noise_statistics_match_numpy_from_per_example_gradients():
    """Per block: mean/std of per-example norms, unbiased tr(Sigma) and |G|^2, B_simple and SNR, from the
    kernels' and biases' contributions against NumPy on the per-example tapes' gradients."""
    keras.utils.set_random_seed(7)
    model = zoo.build("plain_mlp", input_shape=(64,), num_outputs=10, depth=3, width=16)
    x, y = _data((64,), 10, batch=16)
    layers = _linear_layers(model)
    _, flat = reference_norms(model, layers, x, y)
    _, pairs = taps_of(model, layers, x, y)
    sq, sizes = [], []
    for layer, a, g in pairs:
        for v, s in pe.layer_sq_norms(layer, a, g):
            sq.append(s)
            sizes.append(int(np.prod(v.shape)))
    # Groups: each layer (kernel + bias) and everything together.
    layer_groups = [[2 * k, 2 * k + 1] for k in range(len(layers))] + [list(range(len(sq)))]
    bounds = np.cumsum([0] + sizes)
    cols = [np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in grp]) for grp in layer_groups]
    batch_grad = flat.mean(0)
    g2 = tf.constant([float(batch_grad[c] @ batch_grad[c]) for c in cols], tf.float32)
    stats = pe.noise_statistics(pe.norm_sums(pe.group_columns(sq, layer_groups)), g2)
    for k, c in enumerate(cols):
        ref = pe.numpy_noise_statistics(flat[:, c])
        for name in pe.NOISE_STATS:
            got = float(stats[name][k])
            assert got == pytest.approx(ref[name], rel=2e-4), (k, name, got, ref[name])
    assert float(stats["b_simple"][-1]) > 0


def test_noise_statistics_unbiased_on_synthetic_gradients():
    """Averaged over many batches of i.i.d. gradients with known G and Sigma, the estimates hit tr(Sigma) and
    |G|^2 (the naive plug-ins are biased by factors (B-1)/B and + tr(Sigma)/B)."""
    rng = np.random.default_rng(0)
    n, b, trials = 6, 4, 4000
    G = rng.normal(size=n)
    A = rng.normal(size=(n, n)) * 0.7
    sigma = A @ A.T
    g = G + rng.normal(size=(trials, b, n)) @ A.T  # [trials, B, n]
    sq = tf.constant((g ** 2).sum(-1).T.reshape(b, trials) / b ** 2, tf.float32)  # contributions c = g / B
    g2 = tf.constant((g.mean(1) ** 2).sum(-1), tf.float32)
    stats = pe.noise_statistics(pe.norm_sums(sq), g2)
    assert float(np.mean(stats["trace_sigma"])) == pytest.approx(np.trace(sigma), rel=0.03)
    assert float(np.mean(stats["grad_sq"])) == pytest.approx(G @ G, rel=0.05)


def test_norms_inside_tf_function_and_dynamic_batch():
    keras.utils.set_random_seed(8)
    model = zoo.build("transformer", input_shape=(6, 5), num_outputs=4, depth=1, d_model=8, heads=2)
    layer = model.get_layer("block_000_linear")
    tap = keras.Model(model.inputs, [model.outputs[0], layer.input, layer.output])

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5]), tf.TensorSpec([None], tf.int64)])
    def step(x, y):
        with tf.GradientTape() as tape:
            out, a, z = tap(x)
            loss = LOSS(y, out)
        g = tape.gradient(loss, z)
        return tf.stack([sq for _, sq in pe.layer_sq_norms(layer, a, g)])

    x, y = _data((6, 5), 4, batch=6)
    _, pairs = taps_of(model, [layer], x, y)
    eager = np.stack([sq.numpy() for _, sq in pe.layer_sq_norms(layer, *pairs[0][1:])])
    np.testing.assert_allclose(step(x, y).numpy(), eager, rtol=1e-6)
    assert step(x[:3], y[:3]).shape == (2, 3)


@pytest.mark.slow  # a 2-replica MirroredStrategy (~15 s); the single-replica checks stay in the default suite
def test_noise_statistics_additive_over_replicas():
    """Two logical CPUs under MirroredStrategy: per-replica partial sums all-reduced (SUM) give the statistics
    of the global batch (the replica losses are divided by the replica count, as Keras does)."""
    code = textwrap.dedent("""
        import json, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, zoo
        from ablations.instruments import per_example as pe
        from ablations.instruments.kernels import all_reduce_sum
        keras.utils.set_random_seed(9)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 64)).astype("float32"); y = rng.integers(0, 10, (8,))
        out = {}
        for n in (1, 2):
            strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
            with strategy.scope():
                keras.utils.set_random_seed(9)
                model = zoo.build("plain_mlp", input_shape=(64,), num_outputs=10, depth=2, width=8)
            layers = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
            tap = keras.Model(model.inputs, [model.outputs[0]] + [l.input for l in layers] + [l.output for l in layers])
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

            @tf.function
            def step(x, y):
                def replica(x, y):
                    with tf.GradientTape() as tape:
                        outs = tap(x)
                        loss = loss_fn(y, outs[0]) / 8.0  # global-batch mean
                    k = len(layers)
                    grads = tape.gradient(loss, list(outs[1 + k:]) + model.trainable_variables)
                    sq = [s for l, a, g in zip(layers, outs[1:1 + k], grads[:k]) for _, s in pe.layer_sq_norms(l, a, g)]
                    sums = all_reduce_sum(pe.norm_sums(pe.group_columns(sq, [list(range(len(sq)))])))
                    wg = all_reduce_sum(grads[k:])
                    g2 = tf.add_n([tf.reduce_sum(tf.square(g)) for g in wg])[None]
                    return pe.noise_statistics(sums, g2)
                res = strategy.run(replica, (x, y))
                return {k: strategy.experimental_local_results(v)[0] for k, v in res.items()}

            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
            batch = next(iter(strategy.experimental_distribute_dataset(ds)))
            out[n] = {k: float(v[0]) for k, v in step(*batch).items()}
        print("RESULT" + json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    out = json.loads(line[0][6:])
    for name in pe.NOISE_STATS:
        assert out["2"][name] == pytest.approx(out["1"][name], rel=1e-4), (name, out)


# ------------------------------------------------------------------------------------------ the instrument


def _instrument_case(arch, shape, batch=8, seed=0, **opts):
    keras.utils.set_random_seed(seed)
    model = zoo.build(arch, input_shape=shape, num_outputs=4, **opts)
    x, y = _data(shape, 4, batch=batch, seed=seed)
    return model, x, y


def test_instrument_own_cadence_reads_the_weights_before_the_update():
    """per_example every 2 with the probe capturing every step: steps 0 and 2 only, and step 0 equals measure()
    at the initial weights (the attention projections are recomputed from the weights: after the update they
    would differ)."""
    from ablations.probe import DrainCallback, ProbedModel, measure_tables

    model, x, y = _instrument_case("transformer", (5, 4), batch=8, depth=1, d_model=8, heads=2)
    xs = tf.concat([x] * 4, 0)
    ys = tf.concat([y] * 4, 0)
    cap = {"instruments": {"per_example": {"every": 2}}}
    want = measure_tables(model, (x, y), LOSS, training=True, capture=cap, warn=False)["per_example"]
    probe = ProbedModel(model, capture=cap, capacity=16)
    probe.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    drain = DrainCallback(256, 4)
    probe.fit(tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8), epochs=1, verbose=0, callbacks=[drain],
              shuffle=False)
    got = drain.tables(probe)["per_example"]
    assert sorted(got["step"].unique()) == [0, 2]
    g0 = got[got["step"] == 0].reset_index(drop=True)
    for name in pe.NOISE_STATS:
        np.testing.assert_allclose(g0[name], want[name], rtol=1e-4, err_msg=name)
    g2 = got[got["step"] == 2].reset_index(drop=True)
    assert not np.allclose(g2["mean_norm"], g0["mean_norm"], rtol=1e-3)  # the weights did move
    from ablations.report.arm import ArmView
    from ablations.report.figures.arm_noise_scale import arm_noise_scale

    plot = arm_noise_scale(ArmView("a", {}, "a", None, {"per_example": got}))
    assert plot is not None and set(plot.data["block"]) == set(got["block"])


def test_instrument_covers_every_block_kernel_of_mlp_cnn_transformer_and_refuses_batch_norm():
    """(The values are checked against per-example tapes in tests/test_instruments.py.)"""
    from ablations.probe.model import build_instruments
    from ablations.probe.spec import make_spec

    for arch, shape, opts in [("plain_mlp", (12,), dict(depth=3, width=8)),
                              ("resnet_cnn", (6, 6, 1), dict(depth=3, width=4, norm="none")),
                              ("transformer", (5, 4), dict(depth=2, d_model=8, heads=2))]:
        spec = make_spec(zoo.build(arch, input_shape=shape, num_outputs=3, **opts))
        (inst,) = [i for i in build_instruments(spec, {"instruments": {"per_example": True}})
                   if i.name == "per_example"]
        groups = inst.coverage.groups
        assert [g[0] for g in groups] == [*spec.blocks["block"], pe.ALL], arch
        assert all(g[3] == 1.0 for g in groups), (arch, groups)  # every kernel, every tensor covered

    spec = make_spec(zoo.build("resnet_cnn", input_shape=(6, 6, 1), num_outputs=3, depth=3, width=4))
    assert "per_example" not in [i.name for i in build_instruments(spec, {"instruments": {"per_example": True}})]
    assert any("per_example" in n and "BatchNormalization" in n for n in spec.notes)
