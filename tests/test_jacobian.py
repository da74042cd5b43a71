"""Input-output Jacobian spectra: against NumPy's SVD, and the dynamical-isometry results at init."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

import zoo
from ablations.instruments import jacobian as jc


def _x(n, shape, seed=0, dtype="float32"):
    return tf.constant(np.random.default_rng(seed).normal(size=(n, *shape)), dtype)


def numpy_jacobian(fn, x):
    """[B, m, n] float64 by one tape per example (the reference the batch_jacobian path must match)."""
    out = []
    for i in range(int(x.shape[0])):
        xi = tf.reshape(x[i:i + 1], [1, -1])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xi)
            y = tf.reshape(fn(tf.reshape(xi, [1, *x.shape[1:]])), [-1])
        # No pfor: its jacobian of MultiHeadAttention corrupts the heap in TF 2.21 (see the test below).
        out.append(tape.jacobian(y, xi, experimental_use_pfor=False)[:, 0, :].numpy().astype(np.float64))
    return np.stack(out)


def test_sub_model_between_intermediate_tensors():
    """keras.Model(intermediate, intermediate) in Keras 3.15: the path's layers, shared weights, same values;
    a start the end does not depend on exclusively is refused."""
    keras.utils.set_random_seed(0)
    model = zoo.build("resnet_mlp", input_shape=(8,), num_outputs=3, depth=3, width=8)
    bounds = jc.block_boundaries(model)
    assert [b[0] for b in bounds] == ["block_000", "block_001", "block_002"]
    assert bounds[0][1] is model.get_layer("stem_linear").output
    assert bounds[-1][2] is model.get_layer("head_linear").input
    x = _x(4, (8,))
    tap = keras.Model(model.inputs, [bounds[1][1], bounds[-1][2]])
    a, h = tap(x)
    sub = jc.path_model(model, bounds[1][1], bounds[-1][2])
    np.testing.assert_array_equal(sub(a).numpy(), h.numpy())
    assert {id(w) for w in sub.weights} <= {id(w) for w in model.weights}
    with pytest.raises(ValueError, match="not connected"):
        jc.path_model(model, model.get_layer("block_001_linear").output, bounds[-1][2])


def test_block_boundaries_of_given_blocks():
    """Blocks handed in as (name, layers), e.g. from the probe's block discovery on an untagged model."""
    L = keras.layers
    inp = keras.Input((5,))
    h = L.Dense(5, name="a1")(inp)
    h2 = L.Dense(5, name="a2")(L.Activation("tanh", name="t1")(h))
    y = L.Add(name="s1")([h, h2])
    out = L.Dense(2, name="head")(L.Dense(5, name="b1")(y))
    model = keras.Model(inp, out)
    blocks = [("first", [model.get_layer(n) for n in ("a2", "t1", "s1")]), ("second", [model.get_layer("b1")])]
    (n1, i1, o1), (n2, i2, o2) = jc.block_boundaries(model, blocks)
    assert i1 is model.get_layer("a1").output and o1 is model.get_layer("s1").output
    assert i2 is o1 and o2 is model.get_layer("b1").output
    with pytest.raises(ValueError, match="cross its boundary"):
        jc.block_boundaries(model, [("bad", [model.get_layer("t1"), model.get_layer("b1")])])


@pytest.mark.parametrize("arch,opts,shape", [
    ("plain_mlp", dict(depth=3, width=12, activation="tanh"), (10,)),
    ("resnet_cnn", dict(depth=3, width=2, norm="none"), (6, 6, 1)),
    ("transformer", dict(depth=1, d_model=4, heads=2), (3, 2)),
])
def test_exact_spectrum_matches_numpy_svd(arch, opts, shape):
    keras.utils.set_random_seed(1)
    model = zoo.build(arch, input_shape=shape, num_outputs=3, **opts)
    path = jc.io_path(model)
    start = keras.Model(model.inputs, jc.block_boundaries(model)[0][1])(_x(3, shape))
    fn = lambda t: path(t, training=False)  # noqa: E731
    got = jc.jacobian_spectrum(fn, start)
    assert got["method"] == jc.EXACT
    jac = numpy_jacobian(fn, start)
    n = jac.shape[2]
    s = np.linalg.svd(jac, compute_uv=False)
    np.testing.assert_allclose(got["singular_values"].numpy(), s, rtol=1e-4, atol=1e-5 * s.max())
    s2 = np.zeros((jac.shape[0], n))
    s2[:, : s.shape[1]] = s ** 2
    np.testing.assert_allclose(got["mean_sq"].numpy(), s2.mean(1), rtol=1e-4)
    np.testing.assert_allclose(got["var_sq"].numpy(), s2.var(1), rtol=1e-3, atol=1e-6 * s2.max() ** 2)


def test_randomized_matches_exact_on_a_large_enough_case():
    """Top singular values by subspace iteration and the Hutchinson moments, against the exact ones, on a
    width-64 tanh MLP (forced: the switch would take the exact SVD at this size)."""
    keras.utils.set_random_seed(2)
    model = zoo.build("plain_mlp", input_shape=(64,), num_outputs=3, depth=4, width=64, activation="tanh")
    path = jc.io_path(model)
    x = _x(3, (64,))
    fn = lambda t: path(t, training=False)  # noqa: E731
    exact = jc.jacobian_spectrum(fn, x, method=jc.EXACT)
    top = tf.function(lambda: jc.randomized_top_singular_values(fn, x, k=4, oversample=8, power_iters=3))()
    np.testing.assert_allclose(top.numpy(), exact["singular_values"].numpy()[:, :4], rtol=2e-3)
    mom = tf.function(lambda: jc.hutchinson_moments(fn, x, probes=64, seed=3))()
    np.testing.assert_allclose(mom["mean_sq"].numpy(), exact["mean_sq"].numpy(), rtol=0.15)
    np.testing.assert_allclose(mom["var_sq"].numpy(), exact["var_sq"].numpy(), rtol=0.5)
    assert jc.choose_method(64, 64) == jc.EXACT and jc.choose_method(1024, 1024) == jc.RANDOMIZED


@pytest.mark.parametrize("depth", [2, 12])
def test_deep_linear_orthogonal_net_is_an_isometry(depth):
    """Saxe et al. 2014: a product of orthogonal matrices is orthogonal, at any depth."""
    keras.utils.set_random_seed(3)
    model = zoo.build("plain_mlp", input_shape=(16,), num_outputs=3, depth=depth, width=16, activation="linear",
                      initializer="orthogonal")
    got = jc.jacobian_spectrum(lambda t: jc.io_path(model)(t), _x(2, (16,)))
    np.testing.assert_allclose(got["singular_values"].numpy(), 1.0, atol=1e-5)


def test_rezero_at_init_is_exactly_the_identity():
    keras.utils.set_random_seed(4)
    model = zoo.build("rezero_mlp", input_shape=(10,), num_outputs=3, depth=6, width=12)
    path = jc.io_path(model)
    x = keras.Model(model.inputs, jc.block_boundaries(model)[0][1])(_x(3, (10,)))
    jac = numpy_jacobian(lambda t: path(t), x)
    assert np.array_equal(jac, np.broadcast_to(np.eye(12), jac.shape))
    got = jc.jacobian_spectrum(lambda t: path(t), x)
    assert np.array_equal(got["singular_values"].numpy(), np.ones((3, 12), np.float32))
    blocks = jc.block_mean_sq_singular_values(jc.block_paths(model), jc.block_inputs_model(model)(_x(3, (10,))))
    np.testing.assert_array_equal(blocks.numpy(), 1.0)  # Rademacher probes: ||I z||^2 = n exactly


def test_block_gains_hutchinson_against_exact():
    keras.utils.set_random_seed(5)
    model = zoo.build("resnet_mlp", input_shape=(10,), num_outputs=3, depth=3, width=12, activation="tanh")
    paths, ins = jc.block_paths(model), jc.block_inputs_model(model)(_x(4, (10,)))
    exact = jc.block_mean_sq_singular_values(paths, ins, exact=True).numpy()
    est = tf.function(lambda: jc.block_mean_sq_singular_values(paths, ins, probes=64, seed=1))().numpy()
    np.testing.assert_allclose(est, exact, rtol=0.1)
    assert np.all(exact > 1.0)  # identity skip + a branch: gains above 1


def _spread(arch_opts, depth, width=96, examples=3, seeds=2):
    """Mean over seeds and examples of var/mean^2 of the eigenvalues of J J^T (exact), at init."""
    out = []
    for seed in range(seeds):
        keras.utils.set_random_seed(seed)
        model = zoo.build("plain_mlp", input_shape=(width,), num_outputs=2, depth=depth, width=width, **arch_opts)
        path = jc.io_path(model)
        got = tf.function(lambda x: jc.exact_spectrum(lambda t: path(t), x))(_x(examples, (width,), seed))
        out.append(np.mean(got["rel_var_sq"].numpy()))
    return float(np.mean(out))


@pytest.mark.slow  # the depth scan behind the theory (~25 s); the exact-SVD checks stay in the default suite
def test_relu_gaussian_spectrum_spreads_linearly_while_orthogonal_tanh_stays_flat():
    """Pennington, Schoenholz & Ganguli 2017: the variance of the eigenvalues of J J^T (over their mean squared:
    the variance at the critical mean 1, free of finite-width gain fluctuations) grows linearly with depth for
    Gaussian ReLU nets at sigma_w^2 = 2, and for Gaussian linear nets at sigma_w^2 = 1 (slope 1 in theory:
    products of Ginibre matrices), while orthogonal tanh at sigma_w^2 = 1 (sigma_b = 0) stays nearly flat.
    Depths 4-32 at width 96, 2 inits x 3 unit-variance examples each."""
    depths = np.array([4, 8, 16, 32])
    gauss = lambda scale: dict(initializer="variance_scaling", initializer_options=dict(  # noqa: E731
        scale=scale, mode="fan_in", distribution="untruncated_normal"))
    relu = np.array([_spread(dict(activation="relu", **gauss(2.0)), int(d)) for d in depths])
    linear = np.array([_spread(dict(activation="linear", **gauss(1.0)), int(d)) for d in depths])
    tanh = np.array([_spread(dict(activation="tanh", initializer="orthogonal", initializer_options=dict(gain=1.0)),
                             int(d)) for d in depths])
    slope = {k: np.polyfit(depths, v, 1)[0] for k, v in (("relu", relu), ("linear", linear), ("tanh", tanh))}
    assert slope["relu"] > 0.8 and np.corrcoef(depths, relu)[0, 1] > 0.98, relu  # measured ~1.3-1.8 per layer
    assert 0.7 < slope["linear"] < 1.3 and np.corrcoef(depths, linear)[0, 1] > 0.98, linear
    assert abs(slope["tanh"]) < 0.05 * slope["relu"], (tanh, relu)  # measured ~0.01 per layer


# ------------------------------------------------------------------------------------- the instrument


def test_instrument_snapshots_at_init_every_n_steps_and_at_the_end(tmp_path):
    """``capture.instruments.jacobian`` through ``ablations.Probe``: ReZero is exactly the identity at init (every
    singular value and every block gain 1), snapshots every 2 steps on the same examples, one at the end, and
    the tables reach the run folder."""
    from ablations import Probe
    from ablations.report.data import TABLES

    keras.utils.set_random_seed(6)
    net = zoo.build("rezero_mlp", input_shape=(6,), num_outputs=3, depth=4, width=8)
    probe = Probe(net, capture={"instruments": {"jacobian": {"every": 2, "examples": 2}}}, out=tmp_path / "run")
    probe.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype("float32"), rng.integers(0, 3, 40)
    probe.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # 5 steps
    t = probe.tables()
    main, sv, blocks = t["jacobian"], t["jacobian_sv"], t["jacobian_blocks"]
    assert main.groupby("step")["when"].first().to_dict() == {0: "init", 2: "step", 4: "step", 5: "end"}
    assert list(main.columns[:3]) == ["step", "epoch", "when"] and main["method"].eq("exact").all()
    init = sv[sv["when"] == "init"]
    assert len(init) == 2 * 8 and np.array_equal(init["singular_value"].to_numpy(), np.ones(16, np.float32))
    np.testing.assert_array_equal(blocks.loc[blocks["when"] == "init", "mean_sq"].to_numpy(), 1.0)
    assert sorted(blocks["block"].unique()) == [f"block_00{i}" for i in range(4)]
    assert not np.allclose(sv[sv["when"] == "end"]["singular_value"], 1.0)  # alpha moved: no longer the identity
    assert {"jacobian", "jacobian_sv", "jacobian_blocks"} <= set(TABLES)
    arm = next((tmp_path / "run" / "arms").iterdir())
    assert {"jacobian.parquet", "jacobian_sv.parquet", "jacobian_blocks.parquet"} <= {p.name for p in arm.iterdir()}


def test_instrument_options_are_validated_and_off_by_default():
    from ablations import instruments
    from ablations.config import CaptureConfig

    assert "jacobian" not in [c.name for c, _ in instruments.resolve(None)]
    (cls, opts), = [(c, o) for c, o in instruments.resolve({"instruments": {"jacobian": {"k": 4}}}) if c.name == "jacobian"]
    assert cls.snapshot_only and opts.k == 4 and opts.every is None and opts.method == "auto"
    for bad in ({"method": "lanczos"}, {"exampels": 2}, {"examples": 0}):
        with pytest.raises(ValueError):
            CaptureConfig(instruments={"jacobian": bad})


def test_instrument_switches_to_randomized_above_the_exact_size():
    """A 1024-wide block stack (J 1024 x 1024 > EXACT_MAX_ENTRIES): top-k singular values and Hutchinson moments;
    an orthogonal linear net keeps them at 1 (Rademacher probes of an orthogonal map are exact)."""
    from ablations.instruments.jacobian import JacobianSpectrum
    from ablations.probe.spec import make_spec

    keras.utils.set_random_seed(7)
    net = zoo.build("plain_mlp", input_shape=(1024,), num_outputs=2, depth=2, width=1024, activation="linear",
                    initializer="orthogonal")
    inst = JacobianSpectrum(make_spec(net), JacobianSpectrum.Opts(k=3, probes=2, block_probes=1, examples=2))
    assert inst.applies() and inst.method == jc.RANDOMIZED and jc.choose_method(1024, 1024) == jc.RANDOMIZED
    got = inst.snapshot(_x(3, (1024,)).numpy(), "init")
    assert len(got["jacobian_sv"]) == 2 * 3 and got["jacobian"]["sv_min"].isna().all()
    np.testing.assert_allclose(got["jacobian_sv"]["singular_value"], 1.0, atol=1e-4)
    np.testing.assert_allclose(got["jacobian"]["mean_sq"], 1.0, rtol=1e-4)
    np.testing.assert_allclose(got["jacobian"]["var_sq"], 0.0, atol=1e-3)


@pytest.mark.slow  # 12 s (a subprocess); the exact path on the transformer: test_instruments' transformer case
def test_the_exact_path_survives_multi_head_attention():
    """pfor's vectorised jacobian of Keras' MultiHeadAttention segfaults TF 2.21 (heap corruption, rc 139/134):
    the exact path must not use it. Run in a subprocess: a regression kills the process, not the suite."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf, keras
        from ablations.instruments import jacobian as jc
        x = keras.Input((3, 4))
        m = keras.Model(x, keras.layers.MultiHeadAttention(2, 2)(x, x))
        for b in (1, 2, 3):  # batch 1 crashed pfor at once, eagerly (2026-12-02, this machine)
            xs = tf.constant(np.random.default_rng(b).normal(size=(b, 3, 4)), tf.float32)
            eager = jc.exact_spectrum(lambda t: m(t), xs)["singular_values"]
            graph = tf.function(lambda t: jc.exact_spectrum(lambda u: m(u), t))(xs)["singular_values"]
            np.testing.assert_allclose(eager.numpy(), graph.numpy(), rtol=1e-5, atol=1e-6)
        print("ok", eager.shape)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok (3, 12)" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
