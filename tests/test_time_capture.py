"""Through-time gradients captured by the training probe equal the timegrad reference; the run folder
gets time_grads.parquet for recurrent arms."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import zoo
from ablations.config import parse_experiment
from ablations.probe import DrainCallback, ProbedModel
from ablations.sweep import run_sweep
from test_rnn import unrolled_reference

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _net(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return zoo.build("lstm", input_shape=(12, 3), num_outputs=4, depth=2, units=8)


def test_captured_time_grads_match_the_reference_before_the_update() -> None:
    rng = np.random.RandomState(0)
    x = rng.normal(size=(32, 12, 3)).astype(np.float32)
    y = rng.randint(0, 4, size=32)
    reference_net = _net()
    # Independent of the probe's view: an explicitly unrolled loop, one tape per h_t (tests/test_rnn.py).
    _, ref = unrolled_reference(reference_net, x[:16], y[:16], LOSS, False)
    want = np.stack([np.sqrt((r ** 2).sum(axis=(0, 2))) for r in ref])

    net = _net()
    model = ProbedModel(net, every=1, capacity=8)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    drain = DrainCallback(drain_every=256, steps_per_epoch=2)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, callbacks=[drain], verbose=0,
              shuffle=False)
    t = drain.tables(model)["time_grads"]
    assert list(t.columns) == ["step", "epoch", "layer", "depth", "t", "act_grad_norm"]
    assert sorted(t.step.unique()) == [0, 1] and sorted(t.layer.unique()) == ["block_000_rnn", "block_001_rnn"]
    step0 = t[t.step == 0].sort_values(["depth", "t"])["act_grad_norm"].to_numpy().reshape(2, 12)
    np.testing.assert_allclose(step0, want, rtol=1e-5)
    step1 = t[t.step == 1].sort_values(["depth", "t"])["act_grad_norm"].to_numpy().reshape(2, 12)
    assert not np.allclose(step1, want)  # after one SGD step at lr 0.5 the weights (and gradients) moved


@pytest.mark.slow  # 20 s; time_grads against a tape and through the training view: the tests below and test_instruments
def test_recurrent_arm_writes_time_grads(tfds_dir: str, tmp_path: Path) -> None:
    exp = parse_experiment({
        "name": "rnn", "data": {"name": "adding_problem/T50", "max_train_examples": 128, "batch_size": 32,
                                "val_split": None},
        "model": {"arch": "lstm", "units": 8},
        "train": {"epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        "capture": {"every": 2},
    })
    (summary,) = run_sweep(exp, tmp_path)
    assert summary["status"] == "completed", summary
    t = pd.read_parquet(tmp_path / "rnn" / "arms" / summary["arm_id"] / "time_grads.parquet")
    assert sorted(t.step.unique()) == [0, 2]
    assert sorted(t.t.unique()) == list(range(50))
    assert (t.act_grad_norm > 0).all()
    gates = pd.read_parquet(tmp_path / "rnn" / "arms" / summary["arm_id"] / "gates.parquet")
    assert sorted(gates.gate.unique()) == ["forget", "input", "output"]
    assert sorted(gates.when.unique()) == ["end", "init"]
    assert ((gates["mean"] > 0) & (gates["mean"] < 1)).all()
    from ablations.report import build_report

    index = build_report(tmp_path / "rnn", tmp_path / "report")
    html = index.read_text()
    for key in ("grad_vs_time_lag", "gate_saturation"):  # the sequence figures of the report
        assert f"{key}.png" in html and (tmp_path / "report" / f"{key}.png").exists()
    gates_csv = pd.read_csv(tmp_path / "report" / "gate_saturation.csv")
    assert set(gates_csv["when"]) == {"init", "end"}


def _watch_time_grads(monkeypatch) -> list[bool]:
    """Records, per traced compute, whether dL/dh_t came from the training backward pass (True) or a pass of
    its own through the view (False)."""
    from ablations.instruments import _rnn_views

    seen, original = [], _rnn_views.step_time_grads

    def watched(probe, ctx):
        seen.append("time" in ctx.view_grads)
        return original(probe, ctx)

    monkeypatch.setattr(_rnn_views, "step_time_grads", watched)
    return seen


# GRU with every 2 / spe 2 is 15 s: slow; the LSTM and SimpleRNN cases keep the view's equality in the default suite.
@pytest.mark.parametrize("arch,every,spe", [("lstm", 1, 1), pytest.param("gru", 2, 2, marks=pytest.mark.slow),
                                            ("simple_rnn", 1, 1)])
def test_captured_steps_train_through_the_view_exactly_like_keras(monkeypatch, arch: str, every: int,
                                                                 spe: int) -> None:
    seen = _watch_time_grads(monkeypatch)
    rng = np.random.RandomState(1)
    x = rng.normal(size=(48, 12, 3)).astype(np.float32)
    y = rng.randint(0, 4, size=48)
    keras.utils.set_random_seed(0)
    net = zoo.build(arch, input_shape=(12, 3), num_outputs=4, depth=2, units=8)
    twin = keras.models.clone_model(net)
    twin.set_weights(net.get_weights())
    _, ref = unrolled_reference(twin, x[:16], y[:16], LOSS, False)  # the initial weights, the first batch

    model = ProbedModel(net, every=every, capacity=16)
    assert model.train_view is not None and model.train_view.key == "time"
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=LOSS, steps_per_execution=spe)
    drain = DrainCallback(drain_every=256, steps_per_epoch=3)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[drain], verbose=0, shuffle=False)
    twin.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=LOSS)
    twin.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(net.get_weights(), twin.get_weights()):  # the view's forward pass is the model's
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert seen and all(seen)  # no second pass: every trace read the training pass's gradients
    t = drain.tables(model)["time_grads"]
    assert sorted(t.step.unique()) == list(range(0, 6, every))
    step0 = t[t.step == 0].sort_values(["depth", "t"])["act_grad_norm"].to_numpy().reshape(2, 12)
    np.testing.assert_allclose(step0, np.stack([np.sqrt((r ** 2).sum(axis=(0, 2))) for r in ref]), rtol=1e-5)


@pytest.mark.parametrize("mode", ["jit_compile", "mixed_float16"])
def test_the_view_trains_like_keras_under_xla_and_mixed_float16(monkeypatch, mode: str) -> None:
    """Captured steps train through the view (its cell loop) also when XLA compiles them or under a float16
    policy with loss scaling: the weights equal Keras' twin under the same setting, and step 0's dL/dh_t
    the float32 unrolled reference (loss scale removed; float16 activations: within 1e-3)."""
    from ablations.strategy import apply_precision

    seen = _watch_time_grads(monkeypatch)
    rng = np.random.RandomState(1)
    x, y = rng.normal(size=(48, 12, 3)).astype(np.float32), rng.randint(0, 4, size=48)
    keras.utils.set_random_seed(0)
    net = zoo.build("lstm", input_shape=(12, 3), num_outputs=4, depth=2, units=8)
    ref_net = keras.models.clone_model(net)
    ref_net.set_weights(net.get_weights())
    _, ref = unrolled_reference(ref_net, x[:16], y[:16], LOSS, False)
    from ablations import compat

    policy, determinism = keras.mixed_precision.global_policy(), compat.op_determinism_enabled()
    compat.disable_op_determinism()  # an earlier test may have left it on: Keras drops XLA under it
    try:
        if mode == "mixed_float16":
            keras.mixed_precision.set_global_policy("mixed_float16")
            net = apply_precision(net, "mixed_float16")
        twin = keras.models.clone_model(net)
        twin.set_weights(net.get_weights())
        model = ProbedModel(net, capacity=16)
        assert model.train_view is not None and model.train_view.key == "time"
        drain = DrainCallback(drain_every=256, steps_per_epoch=3)
        for m, cbs in ((model, [drain]), (twin, [])):
            m.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), loss=LOSS, jit_compile=mode == "jit_compile")
            m.fit(x, y, batch_size=16, epochs=2, callbacks=cbs, verbose=0, shuffle=False)
    finally:
        keras.mixed_precision.set_global_policy(policy)
        if determinism:
            tf.config.experimental.enable_op_determinism()
    assert bool(model.jit_compile) == (mode == "jit_compile")
    if mode == "mixed_float16":
        assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    for a, b in zip(net.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert seen and all(seen)
    t = drain.tables(model)["time_grads"]
    step0 = t[t.step == 0].sort_values(["depth", "t"])["act_grad_norm"].to_numpy().reshape(2, 12)
    want = np.stack([np.sqrt((r ** 2).sum(axis=(0, 2))) for r in ref])
    np.testing.assert_allclose(step0, want, rtol=1e-5 if mode == "jit_compile" else 1e-3)


@pytest.mark.parametrize("arch", ["simple_rnn", "lstm", "gru"])
def test_per_example_rnn_norms_from_the_training_pass_equal_measure(arch: str) -> None:
    from ablations.probe import measure_tables

    rng = np.random.RandomState(2)
    x = rng.normal(size=(16, 6, 3)).astype(np.float32)
    y = rng.randint(0, 4, size=16)
    keras.utils.set_random_seed(0)
    net = zoo.build(arch, input_shape=(6, 3), num_outputs=4, depth=2, units=6)
    capture = {"instruments": {"per_example": True}}
    # measure: no training, so no view in the step: its own pass through the view (the other code path)
    want = measure_tables(net, (x, y), LOSS, training=True, capture=capture)["per_example"]
    model = ProbedModel(net, capture=capture, capacity=8)
    assert model.train_view is not None
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    drain = DrainCallback(drain_every=256, steps_per_epoch=1)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[drain], verbose=0, shuffle=False)
    got = drain.tables(model)["per_example"]
    keys = [c for c in want.columns if c not in ("step", "epoch") and want[c].dtype == object] or ["block"]
    w, g = want.sort_values(keys).reset_index(drop=True), got.sort_values(keys).reset_index(drop=True)
    assert len(w) == len(g) > 0
    for col in w.columns:
        if col not in ("step", "epoch") and np.issubdtype(w[col].dtype, np.floating):
            np.testing.assert_allclose(g[col].to_numpy(), w[col].to_numpy(), rtol=1e-4, err_msg=col)
