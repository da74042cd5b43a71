"""Distance from initialisation against NumPy, through training, for float32 and float64 weights."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras

import zoo
from ablations.instruments import init_distance as idist


def test_distances_match_numpy_after_training():
    keras.utils.set_random_seed(0)
    model = zoo.build("plain_mlp", input_shape=(8,), num_outputs=3, depth=2, width=6)
    w0 = idist.initial_copy(model.trainable_variables)
    assert float(tf.reduce_max(idist.init_distances(model.trainable_variables, w0)[:, 0])) == 0.0
    rng = np.random.default_rng(0)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(rng.normal(size=(32, 8)), rng.integers(0, 3, 32), epochs=2, batch_size=8, verbose=0)
    got = tf.function(idist.init_distances)(model.trainable_variables, w0).numpy()
    for i, (v, v0) in enumerate(zip(model.trainable_variables, w0)):
        d = np.linalg.norm(v.numpy().astype(np.float64) - v0.numpy())
        assert got[i, 0] == np.float32(d) or abs(got[i, 0] - d) < 1e-6 * max(d, 1e-30)
        n0 = np.linalg.norm(v0.numpy())
        if n0 > 0:
            np.testing.assert_allclose(got[i, 1], d / n0, rtol=1e-6)
        else:  # zero-initialised biases: the ratio is undefined
            assert np.isnan(got[i, 1])


def test_tiny_and_float64_distances_are_exact():
    """A float64 weight moved by 1e-12 (below float32's resolution of the weight) and a float32 one moved by
    1e-25 (its square underflows float32) both read their true distance."""
    w64 = tf.Variable(np.full(10, 0.5), dtype=tf.float64)
    w32 = tf.Variable(np.zeros(10, np.float32) + 1e-25 * np.arange(10, dtype=np.float32))
    w0 = [tf.constant(np.full(10, 0.5)), tf.zeros(10)]
    w64.assign_add(tf.fill([10], tf.constant(1e-12, tf.float64)))
    got = idist.init_distances([w64, w32], w0).numpy()
    np.testing.assert_allclose(got[0, 0], 1e-12 * np.sqrt(10), rtol=1e-4)
    np.testing.assert_allclose(got[0, 1], 1e-12 / 0.5, rtol=1e-4)
    np.testing.assert_allclose(got[1, 0], 1e-25 * np.linalg.norm(np.arange(10)), rtol=1e-5)
    assert np.isnan(got[1, 1])


def test_instrument_reads_the_distance_before_each_update_and_checkpoints_w0():
    """params.init_distance at step t is ||w_t - w_0|| with w_t the weights step t's gradient was taken at
    (recorded by a callback after each step); the copy of w_0 is a variable of the probed model (so
    checkpoints save it and a resume restores it)."""
    from ablations.probe import DrainCallback, ProbedModel

    keras.utils.set_random_seed(1)
    net = zoo.build("plain_mlp", input_shape=(8,), num_outputs=3, depth=2, width=6, bias_init_std=0.1)
    probe = ProbedModel(net, capture={"instruments": {"init_distance": True}}, capacity=16)
    probe.compile(optimizer=keras.optimizers.SGD(0.2, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = [[np.array(v, np.float64) for v in net.trainable_variables]]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([np.array(v, np.float64) for v in net.trainable_variables])

    rng = np.random.default_rng(0)
    drain = DrainCallback(256, 4)
    probe.fit(rng.normal(size=(32, 8)).astype("float32"), rng.integers(0, 3, 32), batch_size=8, epochs=1,
              verbose=0, callbacks=[drain, Record()], shuffle=False)
    p = drain.tables(probe)["params"]
    assert sorted(p["step"].unique()) == [0, 1, 2, 3]
    for step, g in p.groupby("step"):
        want = [np.linalg.norm(w - w0) for w, w0 in zip(seen[step], seen[0])]
        np.testing.assert_allclose(g["init_distance"].to_numpy(), want, rtol=1e-5, atol=1e-7)
        ratio = [d / np.linalg.norm(w0) for d, w0 in zip(want, seen[0])]
        np.testing.assert_allclose(g["init_distance_ratio"].to_numpy(), ratio, rtol=1e-5, atol=1e-7)
    ids = {id(v) for v in probe.variables}
    assert probe.instrument_state and all(id(v) in ids for v in probe.instrument_state)
    np.testing.assert_array_equal(probe.instrument_state[0].numpy(), seen[0][0].astype(np.float32))
    from ablations.report.arm import ArmView
    from ablations.report.figures.arm_init_distance import arm_init_distance

    plot = arm_init_distance(ArmView("a", {}, "a", None, {"params": p}))
    assert plot is not None and plot.data["step"].min() == 1  # step 0 reads 0: not on a log axis
