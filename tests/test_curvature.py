"""Hessian eigenvalue and trace estimators against the explicit Hessian of a tiny model; stability bounds
against Keras' own optimizers on a quadratic; the products under MirroredStrategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import keras

from ablations.instruments import curvature as cv

ROOT = Path(__file__).resolve().parents[1]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")  # Keras losses: float32 by default
MODES = (cv.FORWARD_OVER_REVERSE, cv.REVERSE_OVER_REVERSE)


def _tiny(seed=0, dtype="float64"):
    """4 -> 6 (tanh) -> 2: 44 parameters, float64 so the explicit Hessian is an exact reference."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,), dtype=dtype), keras.layers.Dense(6, activation="tanh", dtype=dtype),
                              keras.layers.Dense(2, dtype=dtype)])
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(16, 4)), dtype)
    y = tf.constant(rng.integers(0, 2, 16))
    return model, (lambda: LOSS(y, model(x)))


def explicit_hessian(loss_fn, variables):
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn()
        g = tf.concat([tf.reshape(t, [-1]) for t in inner.gradient(loss, variables)], 0)
    n = int(g.shape[0])
    h = np.concatenate([tf.reshape(j, [n, -1]).numpy() for j in outer.jacobian(g, variables)], 1)
    return (h + h.T) / 2


def compiled(fn):
    """Runs ``fn`` once as a tf.function (eager while_loops run their Python body per iteration: slow)."""
    return tf.function(fn)()


@pytest.fixture(scope="module")
def tiny():
    model, loss_fn = _tiny()
    return model, loss_fn, explicit_hessian(loss_fn, model.trainable_variables)


@pytest.mark.parametrize("mode", MODES)
def test_hvp_matches_explicit_hessian(tiny, mode):
    model, loss_fn, h = tiny
    v = cv._random([w.shape for w in model.trainable_variables], [w.dtype for w in model.trainable_variables], 5,
                   "normal")
    hv = cv._flat(cv.hvp_fn(loss_fn, model.trainable_variables, mode)(v)).numpy()
    np.testing.assert_allclose(hv, h @ cv._flat(v).numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_top_eigenvalue_is_the_largest_magnitude_one(tiny, mode):
    model, loss_fn, h = tiny
    ev = np.linalg.eigvalsh(h)
    top = ev[np.argmax(np.abs(ev))]
    assert top > 0 and abs(top) > 1.1 * abs(ev[0])  # the test case: positive and isolated at the top
    e = compiled(lambda: cv.top_eigenvalue(cv.hvp_fn(loss_fn, model.trainable_variables, mode),
                                           model.trainable_variables, iterations=60))
    assert float(e.eigenvalue) == pytest.approx(top, rel=1e-2)
    assert float(e.eigenvalue) == pytest.approx(top, rel=1e-6)  # in fact converged
    assert float(e.residual) < 1e-3 and float(e.rel_change) < 1e-6


def test_negative_dominant_spectrum_reports_the_signed_rayleigh_quotient(tiny):
    """The negated loss: the largest |eigenvalue| is negative, and that (not the algebraic maximum) is reported."""
    model, loss_fn, h = tiny
    ev = np.linalg.eigvalsh(-h)
    e = compiled(lambda: cv.top_eigenvalue(cv.hvp_fn(lambda: -loss_fn(), model.trainable_variables),
                                           model.trainable_variables, iterations=60))
    assert float(e.eigenvalue) < 0
    assert float(e.eigenvalue) == pytest.approx(ev[0], rel=1e-2)  # the most negative one
    assert ev[-1] > 0 and float(e.eigenvalue) != pytest.approx(ev[-1], rel=0.5)  # not the largest algebraic


def test_residual_flags_an_unconverged_iteration(tiny):
    model, loss_fn, _ = tiny
    e = compiled(lambda: cv.top_eigenvalue(cv.hvp_fn(loss_fn, model.trainable_variables), model.trainable_variables,
                                           iterations=2))
    assert float(e.residual) > 1e-2


def test_hutchinson_trace(tiny):
    """Exactly the mean of z.Hz over its Rademacher probes; unbiased: within 4 theoretical standard errors;
    its reported standard error near the theoretical sqrt(2 (||H||_F^2 - sum H_ii^2) / n)."""
    model, loss_fn, h = tiny
    variables = model.trainable_variables
    hvp = cv.hvp_fn(loss_fn, variables)
    probes, seed = 300, 3
    got = compiled(lambda: cv.hutchinson_trace(hvp, variables, probes=probes, seed=seed))
    shapes, dtypes = [w.shape for w in variables], [w.dtype for w in variables]
    zs = compiled(lambda: tf.map_fn(
        lambda k: cv._flat(cv._random(shapes, dtypes, tf.stack([tf.constant(seed, tf.int64), k + 1]), "rademacher")),
        tf.range(probes, dtype=tf.int64), fn_output_signature=tf.float64)).numpy()
    assert set(np.unique(np.concatenate(zs))) == {-1.0, 1.0}
    q = np.array([z @ h @ z for z in zs])
    assert float(got["trace"]) == pytest.approx(q.mean(), rel=1e-6)
    sd = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)))
    assert abs(float(got["trace"]) - np.trace(h)) < 4 * sd / np.sqrt(probes)
    assert float(got["stderr"]) == pytest.approx(sd / np.sqrt(probes), rel=0.25)


def test_hutchpp_trace_within_one_percent(tiny):
    """Hutch++ takes the trace of a sketched range exactly: with the sketch at the parameter count (44) it is the
    trace to float precision; with a smaller sketch its error is within its standard error's reach."""
    model, loss_fn, h = tiny
    variables = model.trainable_variables
    hvp = cv.hvp_fn(loss_fn, variables)
    full = compiled(lambda: cv.hutchpp_trace(hvp, variables, sketch=44, probes=2, seed=1))
    assert float(full["trace"]) == pytest.approx(np.trace(h), rel=1e-2)
    assert float(full["trace"]) == pytest.approx(np.trace(h), rel=1e-5)
    part = compiled(lambda: cv.hutchpp_trace(hvp, variables, sketch=20, probes=20, seed=2))
    assert abs(float(part["trace"]) - np.trace(h)) < 5 * float(part["stderr"]) + 1e-6


def test_estimators_run_inside_tf_function(tiny):
    model, loss_fn, h = tiny
    variables = model.trainable_variables

    @tf.function
    def curvature(seed):
        hvp = cv.hvp_fn(loss_fn, variables)
        e = cv.top_eigenvalue(hvp, variables, iterations=60, seed=seed)
        t = cv.hutchinson_trace(hvp, variables, probes=4, seed=seed)
        p = cv.hutchpp_trace(hvp, variables, sketch=44, probes=2, seed=seed)
        return e.eigenvalue, t["trace"], p["trace"]

    lam, _, tr = curvature(tf.constant(3, tf.int64))
    assert float(lam) == pytest.approx(np.max(np.linalg.eigvalsh(h)), rel=1e-5)
    assert float(tr) == pytest.approx(np.trace(h), rel=1e-5)
    assert curvature.experimental_get_tracing_count() == 1
    curvature(tf.constant(4, tf.int64))
    assert curvature.experimental_get_tracing_count() == 1  # a new seed each call: no retrace


def test_warm_start_converges_in_few_iterations(tiny):
    model, loss_fn, h = tiny
    variables = model.trainable_variables
    hvp = cv.hvp_fn(loss_fn, variables)
    first = compiled(lambda: cv.top_eigenvalue(hvp, variables, iterations=40))
    again = cv.top_eigenvalue(hvp, variables, iterations=2, init=first.vector)
    assert float(again.residual) < 1e-3


def test_preconditioned_sharpness_for_adam(tiny):
    """lambda_max(P^-1 H) from the D H D products with Keras Adam's preconditioner after a few steps."""
    model, loss_fn, _ = tiny
    variables = model.trainable_variables
    opt = keras.optimizers.Adam(1e-2)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    h = explicit_hessian(loss_fn, variables)
    d = cv._flat(cv.adam_preconditioner(opt, variables)).numpy()
    # Reference: P from Keras' own state and its update formula.
    t = int(opt.iterations) + 1
    v = np.concatenate([np.ravel(opt._velocities[opt._get_variable_index(w)].numpy()) for w in variables])
    c2 = np.sqrt(1 - opt.beta_2 ** t)
    p = (1 - opt.beta_1 ** t) * (np.sqrt(v) / c2 + opt.epsilon / c2)
    np.testing.assert_allclose(d, 1 / np.sqrt(p), rtol=1e-5)
    ref = np.linalg.eigvals(np.diag(1 / p) @ h).real
    e = compiled(lambda: cv.top_eigenvalue(
        cv.preconditioned(cv.hvp_fn(loss_fn, variables), cv.adam_preconditioner(opt, variables)), variables,
        iterations=200))
    assert float(e.eigenvalue) == pytest.approx(ref[np.argmax(np.abs(ref))], rel=1e-2)
    bound = cv.edge_of_stability(opt)
    assert bound.quantity == "preconditioned_sharpness"
    assert float(bound.value) == pytest.approx(38.0 / 1e-2, rel=1e-5)


# ------------------------------------------------------------------------------------- stability bounds


def _diverges(opt, lam, steps=2000):
    """Keras' optimizer on f(w) = lam w^2 / 2 from w = 1: does |w| grow?"""
    w = keras.Variable(np.ones(1), dtype="float64")
    opt.build([w])

    @tf.function
    def run():
        for _ in tf.range(steps):
            opt.apply_gradients([(tf.constant(lam, tf.float64) * tf.convert_to_tensor(w), w)])

    run()
    return abs(float(w.numpy()[0])) > 1.0


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                    {"momentum": 0.5, "nesterov": True}])
def test_sgd_bounds_match_keras_on_a_quadratic(kwargs):
    lr = 0.1
    bound = cv.edge_of_stability(keras.optimizers.SGD(lr, **kwargs))
    assert bound.quantity == "sharpness"
    assert not _diverges(keras.optimizers.SGD(lr, **kwargs), 0.98 * bound.value)
    assert _diverges(keras.optimizers.SGD(lr, **kwargs), 1.02 * bound.value)


def test_bounds_without_a_value_say_why():
    opts = keras.optimizers
    for opt in (opts.Adagrad(), opts.Adam(amsgrad=True), opts.RMSprop(momentum=0.9)):
        b = cv.edge_of_stability(opt)
        assert b.value is None and b.quantity is None and "no stability bound" in b.reason
    assert cv.stability_bound("sgd", 0.5).value == pytest.approx(4.0)
    assert cv.stability_bound("sgd", 0.5, momentum=0.9).value == pytest.approx(7.6)


# --------------------------------------------------------------------------------------- distribution


@pytest.mark.slow  # a 2-replica MirroredStrategy (~30 s); the single-replica checks stay in the default suite
def test_products_under_mirrored_strategy_give_the_global_batch():
    """Two logical CPUs: inside strategy.run (loops unrolled, the product all-reduced each iteration) and from
    the cross-replica context (strategy.run inside the while_loop), both modes, equal to one replica."""
    code = textwrap.dedent("""
        import json, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        from ablations.instruments import curvature as cv
        rng = np.random.default_rng(0)
        x = rng.normal(size=(16, 4)).astype("float32"); y = rng.integers(0, 2, (16,))
        L = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
        out = {}
        for n in (1, 2):  # few iterations: inside strategy.run the loops are unrolled (8 product graphs)
            strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
            with strategy.scope():
                keras.utils.set_random_seed(0)
                m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh"),
                                      keras.layers.Dense(2)])
            V = m.trainable_variables
            batch = next(iter(strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensor_slices((x, y)).batch(16))))
            loss = lambda x, y: L(y, m(x)) / 16.0
            for mode in (cv.FORWARD_OVER_REVERSE, cv.REVERSE_OVER_REVERSE):
                @tf.function
                def inside(x, y):
                    def replica(x, y):
                        hvp = cv.hvp_fn(lambda: loss(x, y), V, mode)
                        e = cv.top_eigenvalue(hvp, V, iterations=6, seed=1)
                        return tf.stack([e.eigenvalue, cv.hutchinson_trace(hvp, V, probes=2, seed=2)["trace"]])
                    return tf.stack(strategy.experimental_local_results(strategy.run(replica, (x, y))))

                @tf.function
                def outside(x, y):
                    hvp = cv.cross_replica_hvp_fn(strategy, loss, V, (x, y), mode)
                    e = cv.top_eigenvalue(hvp, V, iterations=6, seed=1)
                    return tf.stack([e.eigenvalue, cv.hutchinson_trace(hvp, V, probes=2, seed=2)["trace"]])[None]

                if n == 2 or mode == cv.FORWARD_OVER_REVERSE:
                    out[f"{n} {mode} inside"] = inside(*batch).numpy().tolist()
                if n == 2 and mode == cv.FORWARD_OVER_REVERSE:
                    out[f"{n} {mode} outside"] = outside(*batch).numpy().tolist()
        print("RESULT" + json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    out = json.loads(line[0][6:])
    ref = out[f"1 {cv.FORWARD_OVER_REVERSE} inside"][0]
    for key, rows in out.items():
        for row in rows:  # every replica holds the global result
            np.testing.assert_allclose(row, ref, rtol=1e-4, err_msg=key)


# ----------------------------------------------------------------------------------------- the instrument


def _probed_fit(capture, optimizer, steps=4, seed=0, batch=16):
    """A tiny zoo MLP trained ``steps`` probed steps; returns (curvature table, weights before every step,
    batches, net)."""
    import zoo
    from ablations.probe import DrainCallback, ProbedModel

    keras.utils.set_random_seed(seed)
    net = zoo.build("plain_mlp", input_shape=(4,), num_outputs=3, depth=2, width=5, activation="tanh")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch * steps, 4)).astype("float32")
    y = rng.integers(0, 3, batch * steps)
    before = []

    class Weights(keras.callbacks.Callback):
        def on_train_batch_begin(self, b, logs=None):
            before.append([np.array(v, np.float64) for v in net.trainable_variables])

    model = ProbedModel(net, capture=capture, capacity=4 * steps)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    drain = DrainCallback(drain_every=256, steps_per_epoch=steps)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch), epochs=1, verbose=0, shuffle=False,
              callbacks=[Weights(), drain])
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(steps)]
    return drain.tables(model)["curvature"], before, batches, net


def _hessian_at(net, weights, x, y):
    keep = [np.array(v) for v in net.trainable_variables]
    for v, w in zip(net.trainable_variables, weights):
        v.assign(w.astype(np.float32))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    h = explicit_hessian(lambda: loss(y, net(x, training=False)), net.trainable_variables)
    for v, w in zip(net.trainable_variables, keep):
        v.assign(w)
    return np.linalg.eigvalsh(h)


def test_own_cadence_measures_before_the_update_on_the_steps_batch():
    """every 2 of capture.every 1: steps 0 and 2 recorded, each equal to eigvalsh of the explicit Hessian at the
    weights before that step's update, on that step's batch (not the weights after it)."""
    capture = {"instruments": {"curvature": {"every": 2, "iterations": 150, "probes": 0}}}
    t, before, batches, net = _probed_fit(capture, keras.optimizers.SGD(0.5))
    assert t["step"].tolist() == [0, 2]
    assert t["hessian_trace"].isna().all()  # probes: 0
    for step, got in zip(t["step"], t["sharpness"]):
        ev = _hessian_at(net, before[step], *batches[step])
        assert got == pytest.approx(ev[np.argmax(np.abs(ev))], rel=1e-2)
        after = _hessian_at(net, before[step + 1], *batches[step])
        assert abs(got - after[np.argmax(np.abs(after))]) > 1e-3 * abs(got)  # the update moved it: distinguishable
    np.testing.assert_allclose(t["stability_bound"], 2 / 0.5, rtol=1e-6)
    np.testing.assert_allclose(t["edge_ratio"], t["sharpness"] / 4.0, rtol=1e-6)


@pytest.mark.slow  # 25 s; the bound's rule and the SGD bound stay in the default suite (the test above)
def test_bounds_of_momentum_adam_and_rmsprop():
    """Heavy ball: (2 + 2m)/lr on the sharpness; Adam: 38/lr on the preconditioned sharpness (NaN at step 0,
    before Adam has second moments); RMSprop: no preconditioner here, so no bound (NaN), said in the column."""
    capture = {"instruments": {"curvature": {"every": 1, "iterations": 10, "probes": 2}}}
    t = _probed_fit(capture, keras.optimizers.SGD(0.1, momentum=0.9), steps=2)[0]
    np.testing.assert_allclose(t["stability_bound"], 3.8 / 0.1, rtol=1e-6)
    assert t["preconditioned_sharpness"].isna().all() and np.isfinite(t["edge_ratio"]).all()
    t = _probed_fit(capture, keras.optimizers.Adam(0.01), steps=3)[0]
    np.testing.assert_allclose(t["stability_bound"], 38 / 0.01, rtol=1e-5)
    pre = t["preconditioned_sharpness"].to_numpy()
    assert np.isnan(pre[0]) and np.isfinite(pre[1:]).all() and (pre[1:] > t["sharpness"].to_numpy()[1:]).all()
    np.testing.assert_allclose(t["edge_ratio"][1:], pre[1:] / (38 / 0.01), rtol=1e-5)
    t = _probed_fit(capture, keras.optimizers.RMSprop(0.01), steps=1)[0]
    assert t["stability_bound"].isna().all() and t["edge_ratio"].isna().all() and np.isfinite(t["sharpness"]).all()


def test_options_are_validated_strictly():
    from ablations import instruments
    from ablations.config import CaptureConfig

    opts = instruments.parse_options("curvature", True)
    assert (opts.every, opts.iterations, opts.probes) == (64, 20, 10)
    for bad in ({"iterations": 1}, {"probes": -1}, {"itertions": 5}, {"mode": "lanczos"}, {"every": 0},
                {"batch": "probe"}):
        with pytest.raises(ValueError):
            instruments.parse_options("curvature", bad)
    CaptureConfig(every=16, instruments={"curvature": True})  # the default 64 is a multiple of 16
    with pytest.raises(ValueError, match="multiple of capture.every"):
        CaptureConfig(every=16, instruments={"curvature": {"every": 24}})
    assert "curvature" not in [c.name for c, _ in instruments.resolve(None)]  # opt-in


def test_mse_on_a_classification_dataset_is_against_one_hot_targets() -> None:
    """Cohen et al.'s square loss: ``train.loss: mse`` with class labels one-hots them (Keras' own mse would
    broadcast labels [B] against outputs [B, classes]); the loss serialises with a saved model."""
    import keras

    from ablations.factories import OneHotMeanSquaredError, make_loss

    loss, metrics = make_loss("mse", "classification")
    assert isinstance(loss, OneHotMeanSquaredError) and metrics == ["accuracy"]
    y = np.array([2, 0, 1])
    out = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    want = np.mean((out - np.eye(4)[y]) ** 2)
    np.testing.assert_allclose(float(loss(y, out)), want, rtol=1e-6)
    np.testing.assert_allclose(float(loss(y[:, None], out)), want, rtol=1e-6)  # labels [B, 1] as TFDS gives them
    assert isinstance(keras.losses.deserialize(keras.losses.serialize(loss)), OneHotMeanSquaredError)
    reg, metrics = make_loss("mse", "regression")
    assert isinstance(reg, keras.losses.MeanSquaredError) and metrics == []
