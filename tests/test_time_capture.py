"""Through-time gradients captured by the training probe equal the timegrad reference; the run folder
gets time_grads.parquet for recurrent arms."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
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
