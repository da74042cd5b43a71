"""Dynamic loss scaling (``mixed_float16``): Keras skips a step whose loss-scaled gradients overflow, halves
the scale and leaves the optimizer's step where it was (the first steps at the default scale 2**15 often do).

A skipped step is neither a capture nor a divergence: the step that next trains has its step number. The
reference is plain Keras on the same net, data and optimizer, whose batches that applied an update are read
one by one from the optimizer's step.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from ablations.probe import DrainCallback, ProbedModel

BATCHES, BATCH = 32, 8


@pytest.fixture
def float16_policy():
    was = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy(was)


def _net() -> keras.Model:
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1), name="input")
    h = keras.layers.Flatten(name="stem_flatten")(inp)
    for i in range(2):
        h = keras.layers.Dense(16, name=f"block_{i:03d}_linear")(h)
        h = keras.layers.Activation("relu", name=f"block_{i:03d}_act")(h)
    return keras.Model(inp, keras.layers.Dense(10, dtype="float32", name="head")(h))


def _data() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((BATCHES * BATCH, 8, 8, 1)).astype(np.float32)
    x *= np.repeat(1 + 0.25 * np.arange(BATCHES, dtype=np.float32), BATCH)[:, None, None, None]  # batches differ
    return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 10, len(x)))).batch(BATCH)


def _optimizer() -> keras.optimizers.Optimizer:
    # 2**20: on this net and data Keras skips batches 0, 1, 2, then 4, 6 and 7 (at its default 2**15: 11, 14, 16
    # and 17, all mid-way); both kinds of skip are here.
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=2.0**20)


LOSS = "sparse_categorical_crossentropy"


def _keras_reference() -> tuple[list[int], list[np.ndarray]]:
    """Plain Keras, a step per call: the batches whose update was applied, and the trained weights."""
    net = _net()
    net.compile(optimizer=_optimizer(), loss=LOSS)
    seen: list[int] = []
    read = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda b, logs: seen.append(int(net.optimizer.iterations.numpy())))
    net.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[read])
    return [b for b, (before, after) in enumerate(zip([0, *seen], seen)) if after > before], net.get_weights()


def _grad_norm(batch: int) -> float:
    """The gradient norm of the untrained net on one batch, by hand (no loss scale)."""
    net = _net()
    x, y = next(iter(_data().skip(batch)))
    with tf.GradientTape() as tape:
        loss = keras.losses.get(LOSS)(y, net(x, training=True))
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, net.trainable_variables)
    return float(tf.linalg.global_norm([tf.cast(g, tf.float32) for g in grads]))


@pytest.mark.parametrize("every,k", [(1, 1), (4, 1), (4, 4), (8, 4), (3, 2)])
def test_skipped_steps_are_neither_captured_nor_divergence(float16_policy, every, k):
    applied, weights = _keras_reference()
    skipped = sorted(set(range(BATCHES)) - set(applied))
    assert skipped[0] == 0 and any(b > applied[0] for b in skipped), skipped  # at the start and mid-way
    model = ProbedModel(_net(), every=every, capacity=64)
    model.compile(optimizer=_optimizer(), loss=LOSS, steps_per_execution=k)
    drain = DrainCallback(drain_every=256, steps_per_epoch=BATCHES)
    model.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[drain])
    assert drain.diverged_at is None
    history = drain.tables(model)["history"]
    assert list(history["step"]) == list(range(0, len(applied), every))  # each trained step's number once
    assert np.isfinite(history["global_grad_norm"]).all()
    for a, b in zip(model.net.get_weights(), weights):  # trained exactly like Keras, skips included
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Step 0's statistics are of the first batch that trained, on the untrained weights (skips change none).
    first, batch_0 = _grad_norm(applied[0]), _grad_norm(0)
    assert abs(batch_0 - first) > 0.1 * first  # the two batches' gradients tell apart
    np.testing.assert_allclose(history["global_grad_norm"].iloc[0], first, rtol=2e-2)
    cost = model.train_function.cost()
    assert "dynamic loss scaling" in cost["note"]  # no step counted from the host, every 1 included
    assert cost["probed_over_plain"] is None


def test_a_write_not_due_leaves_a_full_ring_as_it_was():
    """A skipped step's write is not due; in a full ring its slot holds the oldest capture the drain has yet to
    read, which it must not overwrite."""
    from ablations.probe.ring import Ring

    ring = Ring(2, {"x": ((3,), 4)})

    @tf.function
    def write(step, value, due):
        ring.write(4, step, {"x": value}, due=due)

    write(tf.constant(0, tf.int64), tf.fill([3], 1.0), tf.constant(True))
    write(tf.constant(4, tf.int64), tf.fill([3], 2.0), tf.constant(True))
    write(tf.constant(8, tf.int64), tf.fill([3], np.inf), tf.constant(False))
    buf = ring.read()
    assert buf["counts"] == {4: 2} and list(buf["steps"][4]) == [0, 4]
    np.testing.assert_array_equal(buf["values"]["x"], [[1.0] * 3, [2.0] * 3])


def test_an_arm_records_how_many_steps_loss_scaling_skipped(tfds_dir, tmp_path):
    """Through ``ablate run``'s arm: 8 batches at Keras' default initial scale (2**15) on digits, weights drawn
    16x too large so that float16 gradients overflow (5 batches skipped); the summary says how many Keras
    skipped, the tables hold one row per step that trained, and none is a divergence."""
    import pandas as pd

    from ablations.config import parse_experiment
    from ablations.runner import run_arm

    cfg = {"name": "ls", "model": {"arch": "plain_mlp", "depth": 3, "width": 64, "activation": "relu",
                                   "initializer": "variance_scaling", "initializer_options": {"scale": 16.0}},
           "data": {"batch_size": 64},
           "train": {"epochs": 1, "steps_per_epoch": 8, "optimizer": {"name": "sgd", "learning_rate": 0.001}},
           "capture": {"every": 1}, "runtime": {"precision": "mixed_float16"}}
    summary = run_arm(parse_experiment(cfg).arms()[0], tmp_path / "arm")
    history = pd.read_parquet(tmp_path / "arm" / "history.parquet")
    skipped = summary["loss_scale_skipped_steps"]
    assert summary["status"] == "completed" and 0 < skipped < 8, summary
    assert list(history["step"]) == list(range(8 - skipped))  # the optimizer's steps, each once
    assert np.isfinite(history["global_grad_norm"]).all()
    cfg["runtime"]["precision"] = "float32"
    assert "loss_scale_skipped_steps" not in run_arm(parse_experiment(cfg).arms()[0], tmp_path / "f32")


def test_the_arm_page_says_how_many_batches_loss_scaling_skipped():
    from ablations.report import environment

    row = {"arm": "a", "status": "completed", "seed": 0, "time": 1.0, "note": ""}
    for skipped, want in [(5, "3 steps · 5 batches skipped by loss scaling"), (0, None), (None, None)]:
        html = environment().get_template("arm.html").render(
            name="r", row=row, summary={"steps": 3, "loss_scale_skipped_steps": skipped}, figures=[], error=None,
            problems=[], config="", prev=None, next=None, home="", up="")
        page = " ".join(html.split())
        assert (want in page) if want else ("skipped by loss scaling" not in page)


class _InfiniteBackward(keras.layers.Layer):
    """Identity forward, an infinite gradient backward: every step's gradients overflow, the loss stays finite."""

    def call(self, x):
        @tf.custom_gradient
        def poison(v):
            return tf.identity(v), lambda g: g * float("inf")

        return poison(x)


@pytest.mark.parametrize("every,k", [(4, 1), (4, 4), (1, 1)])
def test_gradients_that_overflow_at_every_scale_are_a_divergence(float16_policy, every, k):
    """Keras would skip every step for ever, halving the scale: from 2**15, the 17th skipped batch finds it at
    0.5. A skip at a scale below 1 is the divergence; the skips before it are the scale's search."""
    net = _net()
    net = keras.Model(net.input, _InfiniteBackward(dtype="float32", name="poison")(net.output))
    model = ProbedModel(net, every=every, capacity=64)
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss=LOSS, steps_per_execution=k)
    drain = DrainCallback(drain_every=256, steps_per_epoch=BATCHES)
    history = model.fit(_data(), epochs=1, verbose=0, shuffle=False, callbacks=[drain])
    assert int(opt.iterations.numpy()) == 0 and np.isfinite(history.history["loss"]).all()
    assert drain.diverged_at == 0
    assert len(drain.tables(model)["history"]) == 0  # no step trained, none recorded


def test_with_gradient_accumulation_no_optimizer_step_loses_its_capture():
    """Keras' ``gradient_accumulation_steps`` n: the optimizer's step advances once per n batches, so the host
    cannot count it; every step decides on the device, and every due optimizer step is captured (each of its n
    batches: the tables then hold n rows of that step)."""
    import zoo

    keras.utils.set_random_seed(3)
    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=16)
    model = ProbedModel(net, every=4, capacity=64)
    opt = keras.optimizers.SGD(0.05, gradient_accumulation_steps=2)
    model.compile(optimizer=opt, loss=LOSS, steps_per_execution=4)
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices((rng.random((80, 8, 8, 1), np.float32), rng.integers(0, 10, 80)))
    drain = DrainCallback(drain_every=256, steps_per_epoch=10)
    model.fit(ds.batch(8), epochs=3, verbose=0, shuffle=False, callbacks=[drain])
    assert "gradient_accumulation_steps 2" in model.train_function.cost()["note"]
    steps = drain.tables(model)["history"]["step"]
    assert int(opt.iterations.numpy()) == 15 and sorted(set(steps)) == [0, 4, 8, 12]
