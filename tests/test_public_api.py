"""``ablations.Probe``: a user's own model, compile and fit (own data, optimizer, callbacks), a run folder that
``ablate report`` reads, verdicts with fixes; multi-output, subclassed and block-less models; never silent.

Every stored number is checked against an independent computation: a hand-written ``tf.GradientTape`` over
the user's model on the same batch at the same weights (no probe, no spec, no tap model).
"""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import ablations
from ablations.report import build_report

L = keras.layers
XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits(n=256):
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data[:n] / 16.0).astype("float32"), d.target[:n].astype("int64")


def sigmoid_mlp(depth=8, width=32, name="sigmoid_mlp", seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,))] + [L.Dense(width, activation="sigmoid") for _ in range(depth)]
                            + [L.Dense(10)], name=name)


def tape_norms(model, x, y, loss_fn):
    """Loss and per-variable gradient norms by a plain tape over the model itself."""
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), [float(np.linalg.norm(g.numpy())) if g is not None else 0.0 for g in grads]


class BatchLog(keras.callbacks.Callback):
    """A user's own callback: it must see every batch, as with model.fit."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def test_probe_fits_like_keras_and_writes_a_run_folder_the_report_reads(tmp_path):
    x, y = digits()
    model = sigmoid_mlp()
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    want_loss, want = tape_norms(model, x[:64], y[:64], XENT)  # step 0: the initial weights, the first batch

    probe = ablations.Probe(model, out=tmp_path / "mine")
    probe.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT, metrics=["accuracy"])
    log = BatchLog()
    probe.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[log])
    twin.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT)
    twin.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), twin.get_weights()):  # trained exactly like Keras' own fit
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert len(log.losses) == 8

    arm = tmp_path / "mine" / "arms" / "sigmoid_mlp"
    params = pd.read_parquet(arm / "params.parquet")
    p0 = params[params.step == 0]
    np.testing.assert_allclose(p0["grad_norm"], want, rtol=1e-5)
    history = pd.read_parquet(arm / "history.parquet")
    assert history["step"].tolist() == list(range(8))
    assert history.loc[0, "loss"] == pytest.approx(want_loss, rel=1e-6)
    kernels = [w for w, param in zip(want, p0["param"]) if param == "kernel"][:8]  # the 8 blocks' kernels
    s = json.loads((arm / "summary.json").read_text())
    assert s["status"] == "completed" and s["n_blocks"] == 8 and s["block_rule"] == "graph"
    assert s["ratio_init"] == pytest.approx(kernels[0] / kernels[-1], rel=1e-5)
    assert s["ratio_init"] < 1e-3
    vanishing = next(v for v in s["verdicts"] if v["kind"] == "vanishing")
    kinds = [f["kind"] for f in vanishing["fixes"]]
    assert kinds[:2] == ["activation", "initializer"] and "skip" in kinds
    assert all(f["source"] and f["config"] == {} and f["keras"] for f in vanishing["fixes"])  # not a zoo model
    assert (arm / "final.keras").exists() and (arm / "arm.yaml").exists()

    index = build_report(tmp_path / "mine", tmp_path / "report")
    page = (tmp_path / "report" / "arms" / "sigmoid_mlp" / "index.html").read_text()
    assert "vanishing" in index.read_text() and "Glorot &amp; Bengio 2010" in page and "Block discovery" in page


@pytest.mark.slow  # 15 s; one probe's run folder and report: test_probe_fits_like_keras_and_writes_a_run_folder_the_report_reads
def test_two_probes_in_one_folder_are_compared_and_fits_accumulate(tmp_path):
    x, y = digits(128)
    for act in ("sigmoid", "relu"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,))] + [L.Dense(16, activation=act) for _ in range(4)]
                                 + [L.Dense(10)], name=f"{act}_mlp")
        probe = ablations.Probe(model, capture={"every": 2}, drain_every=3)
        probe.compile(optimizer="adam", loss=XENT, steps_per_execution=4)  # more than the buffer held: it grows
        probe.fit(x, y, batch_size=32, epochs=1, verbose=0)
        probe.fit(x, y, batch_size=32, epochs=1, verbose=0)
        arm = probe.save_run(tmp_path / "cmp")
        h = pd.read_parquet(arm / "history.parquet")
        assert h["step"].tolist() == [0, 2, 4, 6]  # two fits, every 2nd step, nothing lost
        assert json.loads((arm / "summary.json").read_text())["lost_captures"] == 0
    exp = (tmp_path / "cmp" / "experiment.yaml").read_text()
    assert "sigmoid_mlp" in exp and "relu_mlp" in exp
    from ablations.report.data import load_run

    run = load_run(tmp_path / "cmp")
    assert run.axes == ["model"] and len(run.summaries) == 2
    assert run.notes == [] and run.others == {} and run.damaged == {}  # read as written, nothing left out


def two_heads():
    keras.utils.set_random_seed(0)
    x = keras.Input((64,), name="x")
    h = L.Activation("tanh", name="act1")(L.Dense(16, name="trunk1")(x))
    h = L.Activation("tanh", name="act2")(L.Dense(16, name="trunk2")(h))
    return keras.Model(x, {"cls": L.Dense(10, name="cls")(h), "reg": L.Dense(1, name="reg")(h)}, name="two_heads")


def test_multi_output_uses_the_compiled_loss_over_all_outputs_or_a_named_one(tmp_path):
    x, y = digits(64)
    target = {"cls": y, "reg": x[:, :1]}
    model = two_heads()

    def both(yt, yp):  # the compiled loss by hand: sum over outputs with their weights
        return XENT(yt["cls"], yp["cls"]) + 0.5 * keras.losses.MeanSquaredError()(yt["reg"], yp["reg"])

    want_loss, want = tape_norms(model, x, target, both)
    probe = ablations.Probe(model)
    probe.compile(optimizer=keras.optimizers.SGD(0.01), loss={"cls": XENT, "reg": "mse"},
                  loss_weights={"cls": 1.0, "reg": 0.5})
    probe.fit(x, target, batch_size=64, epochs=1, verbose=0)
    t = probe.tables()
    np.testing.assert_allclose(t["params"]["grad_norm"], want, rtol=1e-5)
    assert t["history"].loc[0, "loss"] == pytest.approx(want_loss, rel=1e-6)

    model = two_heads()
    want_loss, want = tape_norms(model, x, y, lambda yt, yp: XENT(yt, yp["cls"]))
    probe = ablations.Probe(model, output="cls")
    probe.compile(optimizer=keras.optimizers.SGD(0.01), loss=XENT)
    probe.fit(x, y, batch_size=64, epochs=1, verbose=0)
    p = probe.tables()["params"]
    assert "reg" not in set(p["layer"])  # the other head is not part of what is trained
    by_var = dict(zip([v.path for v in model.trainable_variables], want))
    np.testing.assert_allclose(p["grad_norm"], [by_var[v.path] for v in probe.net.trainable_variables], rtol=1e-5)
    probe.save_run(tmp_path / "mo")
    assert keras.saving.load_model(tmp_path / "mo" / "arms" / "two_heads" / "final.keras").output_names == ["cls", "reg"]
    with pytest.raises(ValueError, match="no output 'nope'.*cls, reg"):
        ablations.Probe(two_heads(), output="nope")


class Net(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.a = L.Dense(16, activation="relu", name="a")
        self.b = L.Dense(10, name="b")

    def call(self, x):
        return self.b(self.a(x))


def test_subclassed_model_gets_per_tensor_statistics_and_a_note(tmp_path):
    x, y = digits(64)
    keras.utils.set_random_seed(0)
    model = Net()
    model(x[:1])
    want_loss, want = tape_norms(model, x, y, XENT)
    probe = ablations.Probe(model, out=tmp_path / "sub")
    probe.compile(optimizer=keras.optimizers.SGD(0.01), loss=XENT)
    probe.fit(x, y, batch_size=64, epochs=1, verbose=0)
    s = json.loads((tmp_path / "sub" / "arms" / "net" / "summary.json").read_text())
    assert s["status"] == "completed" and s["n_blocks"] == 0 and s["verdicts"] == []
    assert len(s["notes"]) == 1 and "functional API" in s["notes"][0]
    p = pd.read_parquet(tmp_path / "sub" / "arms" / "net" / "params.parquet")
    np.testing.assert_allclose(p["grad_norm"], want, rtol=1e-5)
    from ablations.ui import arm_notes

    assert arm_notes(s) == s["notes"]  # printed per arm by `ablate run`


def test_a_misspelt_or_bad_capture_key_is_an_error_naming_it():
    model = sigmoid_mlp(depth=2, width=8)
    with pytest.raises(ValueError, match=r"unknown key 'capture.evry'. Did you mean 'every'\?.*drain_every"):
        ablations.Probe(model, capture={"evry": 2})
    with pytest.raises(ValueError, match=r"'capture.every': Input should be greater than 0"):
        ablations.Probe(model, capture={"every": 0})
    with pytest.raises(ValueError, match=r"capture.drain_every': not a drain interval"):
        ablations.Probe(model, drain_every=0)
    with pytest.raises(ValueError, match=r"takes a dict .* not list"):
        ablations.Probe(model, capture=[1])


def test_the_buffer_is_sized_as_ablate_run_sizes_it_unless_told():
    from ablations.probe.recorder import AUTO_DRAIN, RING_SHARE, auto_drain_every, ring_capacity, weight_bytes

    wide = ablations.Probe(sigmoid_mlp(depth=4, width=128), capture={"every": 2})
    weights, per = weight_bytes(wide.net), wide.ring.bytes_per_capture()
    steps = wide.recorder.drain_every
    assert AUTO_DRAIN[0] < steps < AUTO_DRAIN[1]  # neither bound: the share decided it
    assert wide.ring.capacity == ring_capacity(2, steps, steps, 1)
    assert wide.ring.capacity * per <= RING_SHARE * weights < ring_capacity(2, steps + 2, steps + 2, 1) * per
    wide.compile(optimizer="sgd", loss=XENT, steps_per_execution=8)  # the interval leaves room for the execution
    assert wide.recorder.drain_every == auto_drain_every(per, weights, 2, 8) == steps - 7
    small = ablations.Probe(sigmoid_mlp(depth=2, width=8))
    assert small.recorder.drain_every == AUTO_DRAIN[0]  # a tiny net: the floor, not a share of nothing
    told = ablations.Probe(sigmoid_mlp(depth=2, width=8), capture={"drain_every": 40}, drain_every=24)
    assert told.recorder.drain_every == 24 and told.ring.capacity == ring_capacity(1, 24, 24, 1)
    assert ablations.Probe(sigmoid_mlp(depth=2, width=8), capture={"drain_every": 40}).recorder.drain_every == 40


def test_a_model_without_blocks_is_never_silent():
    x, y = digits(32)
    inp = keras.Input((64,))
    model = keras.Model(inp, L.Dense(10, name="only")(inp), name="logreg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = ablations.measure(model, (x, y), XENT)
    assert any("no blocks found" in str(w.message) and "block_<i>_<part>" in str(w.message) for w in caught)
    assert any("no blocks found" in n for n in df.attrs["notes"])
    _, want = tape_norms(model, x, y, XENT)
    np.testing.assert_allclose(df["grad_norm"], want, rtol=1e-5)


def test_keras_application_block_kernels_are_the_tapped_layers():
    """The per-block series reads the kernel of each block's tapped layer (MobileNetV2: the expand conv, or
    the depthwise conv of the first block), so ratio and decay rate equal a tape over those kernels."""
    from ablations.instruments.param_norms import block_kernels
    from ablations.probe import make_spec

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=4,
                                             classifier_activation=None)
    spec = make_spec(model)
    xs = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
    ys = np.array([0, 3])
    df = ablations.measure(model, (xs, ys), XENT)
    k = block_kernels(df.assign(step=0))
    assert k["layer"].tolist() == [v.pre_layer for v in spec.views] and len(k) == 17
    with tf.GradientTape() as tape:
        loss = XENT(ys, model(xs))
    layers = [model.get_layer(v.pre_layer) for v in spec.views]
    kernels = [next(w for w in layer.trainable_weights if w.name.endswith("kernel")) for layer in layers]
    g = [float(np.linalg.norm(t.numpy())) for t in tape.gradient(loss, kernels)]
    np.testing.assert_allclose(k["grad_norm"], g, rtol=1e-4)


def test_functional_lstm_trains_and_says_which_recurrent_statistics_need_zoo_names():
    keras.utils.set_random_seed(0)
    xi = keras.Input((7, 3))
    h = L.LSTM(8, return_sequences=True, name="lstm_a")(xi)
    model = keras.Model(xi, L.Dense(10, name="out")(L.LSTM(8, name="lstm_b")(h)), name="lstm_net")
    x = np.random.default_rng(0).normal(size=(16, 7, 3)).astype("float32")
    y = np.arange(16) % 10
    _, want = tape_norms(model, x, y, XENT)
    probe = ablations.Probe(model)
    probe.compile(optimizer=keras.optimizers.SGD(0.01), loss=XENT)
    probe.fit(x, y, batch_size=16, epochs=2, verbose=0)
    s = probe.summary_dict()
    assert s["n_blocks"] == 2 and np.isfinite(s["ratio_init"])
    assert any("no gradients through time" in n and "block_<i>_rnn" in n for n in s["notes"])
    p = probe.tables()["params"]
    np.testing.assert_allclose(p[p.step == 0]["grad_norm"], want, rtol=1e-5)
