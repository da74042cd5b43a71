"""Spectral norms tracked through training against NumPy's SVD of the weights each step saw; the matrix rule
for convolutions, attention and depthwise kernels; a kernel of zeros."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import zoo
from ablations.instruments import spectral_norm as sn


def _fit(net, capture, steps, lr, x_shape, momentum=0.9, spe=1):
    """Fits ``steps`` SGD steps (batch 8); returns the params table and the weights before every step."""
    from ablations.probe import DrainCallback, ProbedModel

    probe = ProbedModel(net, capture=capture, capacity=64)
    probe.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=spe)
    seen = [[np.array(v, np.float64) for v in net.trainable_variables]]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([np.array(v, np.float64) for v in net.trainable_variables])

    rng = np.random.default_rng(0)
    drain = DrainCallback(256, steps)
    probe.fit(rng.normal(size=(8 * steps, *x_shape)).astype("float32"), rng.integers(0, 3, 8 * steps),
              batch_size=8, epochs=1, verbose=0, callbacks=[drain, Record()], shuffle=False)
    return drain.tables(probe)["params"], seen, probe


@pytest.mark.parametrize("every,block", [(1, 4), (4, 4), (1, 1)])
def test_the_tracked_norm_follows_the_svd_of_the_weights_through_training(every: int, block: int) -> None:
    """Large steps (lr 0.5, momentum 0.9) move the kernels' spectra; at every captured step the stored value is
    the SVD's of the weights that step's gradient was taken at (a fixed 2 power iterations per capture were
    1.2% off here). Also with one vector (plain power iteration), whose spectra here are not clustered."""
    keras.utils.set_random_seed(0)
    net = zoo.build("plain_mlp", input_shape=(12,), num_outputs=3, depth=3, width=16)
    p, seen, _ = _fit(net, {"every": every, "instruments": {"spectral_norm": {"block": block}}}, 12, 0.5, (12,))
    assert sorted(p["step"].unique()) == list(range(0, 12, every))
    kernels = [i for i, v in enumerate(net.trainable_variables) if v.path.endswith("kernel")]
    for step, g in p.groupby("step"):
        g = g.reset_index(drop=True)
        want = [np.linalg.svd(seen[step][i], compute_uv=False)[0] for i in kernels]
        np.testing.assert_allclose(g.loc[kernels, "spectral_norm"], want, rtol=2e-4, err_msg=f"step {step}")
        assert (g.loc[kernels, "spectral_norm"].to_numpy() <= np.array(want) * (1 + 1e-6)).all()  # from below
        assert g.drop(index=kernels)["spectral_norm"].isna().all()  # biases
        assert (g.loc[kernels, "spectral_norm_converged"] == 1.0).all()
    moved = [abs(np.linalg.svd(seen[-1][i], compute_uv=False)[0] / np.linalg.svd(seen[0][i], compute_uv=False)[0] - 1)
             for i in kernels]
    assert max(moved) > 0.05  # the test would see a stale estimate


@pytest.mark.parametrize("spe", [1, 4])
def test_a_cadence_of_its_own_fills_its_steps_and_leaves_the_other_captures_nan(spe: int) -> None:
    """spectral_norm every 4 and init_distance every 8 steps on a probe capturing every 2: the params table has
    every captured step; their columns hold the SVD's / the distance of the weights each of their steps saw,
    NaN on the probe's other captures (with steps_per_execution 4 too: two captured steps an execution, one call)."""
    keras.utils.set_random_seed(0)
    net = zoo.build("plain_mlp", input_shape=(12,), num_outputs=3, depth=3, width=16)
    capture = {"every": 2, "instruments": {"spectral_norm": {"every": 4}, "init_distance": {"every": 8}}}
    p, seen, probe = _fit(net, capture, 12, 0.5, (12,), spe=spe)
    assert probe.train_function.mixed_calls == (3 if spe == 4 else 0)  # spe 4: every execution is one call
    seen = seen[::1] if spe == 1 else [w for w in seen for _ in range(spe)]  # the callback runs per execution
    assert sorted(p["step"].unique()) == list(range(0, 12, 2))
    assert p["grad_norm"].notna().all() and len(p) == 6 * len(net.trainable_variables)
    kernels = [i for i, v in enumerate(net.trainable_variables) if v.path.endswith("kernel")]
    for step, g in p.groupby("step"):
        g = g.reset_index(drop=True)
        if step % 4:
            assert g["spectral_norm"].isna().all() and g["spectral_norm_converged"].isna().all(), step
        else:
            want = [np.linalg.svd(seen[step][i], compute_uv=False)[0] for i in kernels]
            np.testing.assert_allclose(g.loc[kernels, "spectral_norm"], want, rtol=2e-4, err_msg=f"step {step}")
        if step % 8:
            assert g["init_distance"].isna().all(), step
        else:
            want = [np.linalg.norm(w - w0) for w, w0 in zip(seen[step], seen[0])]
            np.testing.assert_allclose(g["init_distance"], want, rtol=1e-5, atol=1e-7, err_msg=f"step {step}")


def test_a_capped_iteration_from_a_stale_vector_reads_below_the_truth_and_says_so() -> None:
    """The estimate never exceeds sigma_max; stopped by the cap, its relative change says it had not converged;
    left to the tolerance, it converges (one vector: plain power iteration)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    m = rng.normal(size=(1, 30, 20))
    v0 = rng.normal(size=(1, 20))
    v0 /= np.linalg.norm(v0)
    sigma, ok, v = sn.subspace_iteration(tf.constant(m), tf.constant(v0[..., None]), 1e-12, 3)
    true = np.linalg.svd(m[0], compute_uv=False)[0]
    assert float(sigma[0]) < true * (1 - 1e-4) and float(ok[0]) == 0.0
    sigma, ok, _ = sn.subspace_iteration(tf.constant(m), v, 1e-13, 1000)
    np.testing.assert_allclose(float(sigma[0]), true, rtol=1e-9)
    assert float(ok[0]) == 1.0


def test_a_kernel_of_zeros_reads_0_and_recovers_when_it_moves() -> None:
    import tensorflow as tf

    v = tf.constant([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]], tf.float64)
    sigma, ok, v = sn.subspace_iteration(tf.zeros([1, 4, 3], tf.float64), v, 1e-5, 2)
    assert float(sigma[0]) == 0.0 and float(ok[0]) == 1.0 and np.isfinite(v.numpy()).all()
    m = np.random.default_rng(1).normal(size=(1, 4, 3))
    sigma, _, _ = sn.subspace_iteration(tf.constant(m), v, 1e-13, 1000)
    np.testing.assert_allclose(float(sigma[0]), np.linalg.svd(m[0], compute_uv=False)[0], rtol=1e-9)


def test_which_tensors_are_matrices_and_how_they_are_read() -> None:
    assert sn.matrix_shape("kernel", (3, 3, 4, 8)) == (36, 8)  # convolution: Miyato's [kh*kw*in, out]
    assert sn.matrix_shape("query/kernel", (16, 2, 8)) == (16, 16)  # attention: d -> heads * head_dim
    assert sn.matrix_shape("attention_output/kernel", (2, 8, 16)) == (16, 16)
    assert sn.matrix_shape("recurrent_kernel", (5, 20)) == (5, 20)
    assert sn.matrix_shape("bias", (8,)) is None and sn.matrix_shape("gamma", (8,)) is None
    assert sn.matrix_shape("kernel", (3, 3, 4, 1), depthwise=True) is None
    # A depthwise convolution in a real model: its kernel reads NaN, the pointwise 1x1 convolution a value.
    inp = keras.Input((6, 6, 3))
    h = keras.layers.DepthwiseConv2D(3, name="dw")(inp)
    h = keras.layers.Conv2D(4, 1, name="pw")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    net = keras.Model(inp, out)
    p, seen, _ = _fit(net, {"instruments": {"spectral_norm": True}}, 1, 0.01, (6, 6, 3))
    got = dict(zip(p["layer"] + "/" + p["param"], p["spectral_norm"]))
    assert np.isnan(got["dw/kernel"])
    pw = next(w for v, w in zip(net.trainable_variables, seen[0]) if v.path == "pw/kernel")
    np.testing.assert_allclose(got["pw/kernel"], np.linalg.svd(pw.reshape(-1, 4), compute_uv=False)[0], rtol=1e-5)


def test_the_vectors_are_variables_of_the_probed_model_and_iterations_are_validated() -> None:
    from ablations.instruments import parse_options

    keras.utils.set_random_seed(0)
    net = zoo.build("plain_mlp", input_shape=(12,), num_outputs=3, depth=2, width=16)
    _, _, probe = _fit(net, {"instruments": {"spectral_norm": {"max_iterations": 1}}}, 2, 0.1, (12,))
    ids = {id(v) for v in probe.variables}
    assert probe.instrument_state and all(id(v) in ids for v in probe.instrument_state)
    with pytest.raises(ValueError, match="max_iterations"):
        parse_options("spectral_norm", {"max_iterations": 0})
    with pytest.raises(ValueError, match="iterations"):
        parse_options("spectral_norm", {"iterations": 3})
