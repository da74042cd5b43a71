"""Every instrument on every zoo family it applies to: in graph (a real fit step) == measure() == reference.

The harness (tests/harness.py) builds each model once; this file compares, per instrument, every column it
writes. Adding an instrument means adding its reference to ``harness.REFERENCES``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import harness
from ablations import instruments

RTOL = 1e-4  # float32 models: the probe's tape and the hand-written one round differently
_cases: dict[str, harness.Case] = {}


def case(name: str) -> harness.Case:
    if name not in _cases:
        _cases[name] = harness.make_case(name)
    return _cases[name]


def _close(got: np.ndarray, want: np.ndarray, what: str, atol: float = 1e-7, rtol: float = RTOL) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern")
    ok = ~np.isnan(want)
    # float32 cancellation leaves ~1e-7 of the column's scale where the exact value is 0 (the bias of a conv
    # before batch norm has no gradient in exact arithmetic): that much absolute error is round-off.
    scale = float(np.abs(want[ok]).max()) if ok.any() else 0.0
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol, atol=max(atol, 1e-6 * scale), err_msg=what)


def _shared(c: harness.Case, inst, want: dict[str, np.ndarray]) -> None:
    table = inst.table
    graph, eager = c.graph[table], c.eager[table]
    assert graph["step"].unique().tolist() == [0]
    for col in inst.columns:
        atol = 2.0 / c.x.size if col.name in ("act_saturation", "act_dead") else 1e-7  # one entry on a threshold
        _close(graph[col.name].to_numpy(), want[col.name], f"{c.name}/{inst.name}/{col.name} in graph", atol)
        if col.name in ("update_norm", "lr"):  # measure() applies no update and has no optimizer
            assert eager[col.name].isna().all()
            continue
        _close(eager[col.name].to_numpy(), want[col.name], f"{c.name}/{inst.name}/{col.name} in measure()", atol)


def _grad_hist(c: harness.Case, inst, want: pd.DataFrame) -> None:
    for source, tables in (("in graph", c.graph), ("measure()", c.eager)):
        t = tables["grad_hist"]
        for block, counts in zip(want["block"], want["counts"]):
            got = t[t["block"] == block].set_index("bin")["count"]
            got = np.append(got.loc[range(len(counts) - 1)].to_numpy(), got.loc[-1])
            # An entry within float32 rounding of a power of two may land in the next bin.
            assert np.abs(got - counts).sum() <= max(2, 0.002 * counts.sum()), f"{c.name} {block} {source}"
            assert got.sum() == counts.sum()


def _time_grads(c: harness.Case, inst, want: dict[str, np.ndarray]) -> None:
    for source, tables in (("in graph", c.graph), ("measure()", c.eager)):
        t = tables["time_grads"].sort_values(["depth", "t"])
        got = t["act_grad_norm"].to_numpy().reshape(want["act_grad_norm"].shape)
        _close(got, want["act_grad_norm"], f"{c.name}/time_grads {source}")


def _own_rows(c: harness.Case, inst, want: pd.DataFrame) -> None:
    """An own table with one row per block at step 0: every column the reference has, matched on the block."""
    for source, tables in (("in graph", c.graph), ("measure()", c.eager)):
        t = tables[inst.table]
        assert t["step"].unique().tolist() == [0]
        got = t.set_index("block").loc[want["block"]]
        np.testing.assert_array_equal(got["depth"].to_numpy(), want["depth"].to_numpy())
        for col in want.columns.drop(["block", "depth"]):
            rtol = want.attrs.get("rtol", {}).get(col, RTOL)
            _close(got[col].to_numpy(), want[col].to_numpy(), f"{c.name}/{inst.name}/{col} {source}", rtol=rtol)
    static = [k for k in ("depth", "block", "tensors", "coverage") if k in c.graph[inst.table]]
    pd.testing.assert_frame_equal(c.graph[inst.table][static], c.eager[inst.table][static])


def _curvature(c: harness.Case, inst, want: dict) -> None:
    """Top eigenvalue within 1% of eigvalsh's largest-magnitude one; the trace within 1% of the same probes'
    z.Hz and within 5 of its standard errors of tr(H); the bound 2/lr (no optimizer in measure(): NaN)."""
    for source, tables in (("in graph", c.graph), ("measure()", c.eager)):
        r = tables["curvature"]
        assert r["step"].tolist() == [0], source
        r = r.iloc[0]
        what = f"{c.name}/curvature {source}"
        assert r["sharpness"] == pytest.approx(want["sharpness"], rel=1e-2), what
        assert r["hessian_trace"] == pytest.approx(want["trace_same_probes"], rel=1e-2), what
        assert abs(r["hessian_trace"] - want["trace"]) < 5 * r["hessian_trace_stderr"], what
        assert np.isnan(r["preconditioned_sharpness"]), what
        if source == "in graph":
            assert r["lr"] == pytest.approx(want["lr"]) and r["stability_bound"] == pytest.approx(want["stability_bound"])
            assert r["edge_ratio"] == pytest.approx(want["sharpness"] / want["stability_bound"], rel=1e-2)
        else:
            assert np.isnan(r["lr"]) and np.isnan(r["stability_bound"]) and np.isnan(r["edge_ratio"])


def _jacobian(c: harness.Case, inst, want: dict[str, np.ndarray]) -> None:
    """The snapshot at the initial weights against NumPy's SVD of the explicit Jacobians."""
    with c.initial_weights():
        got = inst.snapshot(c.x, "init")
    main, sv, blocks = got["jacobian"], got["jacobian_sv"], got["jacobian_blocks"]
    assert main["method"].unique().tolist() == ["exact"] and (main["when"] == "init").all()
    s = want["singular_value"]
    _close(sv["singular_value"].to_numpy().reshape(s.shape), s, f"{c.name}/jacobian singular values",
           atol=1e-5 * float(s.max()))
    _close(main["mean_sq"].to_numpy(), want["mean_sq"], f"{c.name}/jacobian mean_sq")
    np.testing.assert_allclose(main["var_sq"].to_numpy(), want["var_sq"], rtol=1e-3,
                               atol=1e-6 * float(s.max()) ** 4, err_msg=f"{c.name}/jacobian var_sq")
    _close(main["sv_max"].to_numpy(), s[:, 0], f"{c.name}/jacobian sv_max")
    _close(main["sv_min"].to_numpy(), s[:, -1], f"{c.name}/jacobian sv_min", atol=1e-5 * float(s.max()))
    # Hutchinson with 256 Rademacher probes per block: a few percent
    np.testing.assert_allclose(blocks["mean_sq"].to_numpy(), want["blocks"], rtol=0.15,
                               err_msg=f"{c.name}/jacobian_blocks mean_sq")


@pytest.mark.parametrize("model", list(harness.MODELS))
def test_every_instrument_matches_measure_and_an_independent_reference(model: str) -> None:
    c = case(model)
    checked = []
    for inst in c.instruments:
        if inst.name in harness.ELSEWHERE:
            continue
        want = harness.REFERENCES[inst.name](c)
        if inst.table in instruments.SHARED_TABLES:
            _shared(c, inst, want)
        elif inst.name == "grad_hist":
            _grad_hist(c, inst, want)
        elif inst.name == "time_grads":
            _time_grads(c, inst, want)
        elif inst.name == "jacobian":
            _jacobian(c, inst, want)
        elif inst.name == "curvature":
            _curvature(c, inst, want)
        elif isinstance(want, pd.DataFrame) and "block" in want:
            _own_rows(c, inst, want)
        else:
            raise AssertionError(f"harness: no comparison for the own table of {inst.name}")
        checked.append(inst.name)
    assert {"step", "param_norms"} <= set(checked), checked


def test_every_instrument_has_a_reference_and_a_model_it_applies_to() -> None:
    applied = {i.name for name in harness.MODELS for i in case(name).instruments}
    for cls in instruments.classes():
        assert cls.name in harness.REFERENCES or cls.name in harness.ELSEWHERE, \
            f"instrument {cls.name}: add its reference to tests/harness.py REFERENCES"
        assert cls.name in applied, f"instrument {cls.name} applies to none of the harness models"


def test_the_harness_would_catch_a_wrong_value() -> None:
    """A test must be able to fail: a perturbed column is reported."""
    c = case("plain_mlp")
    inst = next(i for i in c.instruments if i.name == "preact_grad")
    want = harness.REFERENCES["preact_grad"](c)
    want["act_grad_norm"] = want["act_grad_norm"] * (1 + 1e-3)
    with pytest.raises(AssertionError):
        _shared(c, inst, want)


# ------------------------------------------------------------------------- beyond one step's values


def _fit(net, capture, steps: int = 6, optimizer=None, seed: int = 0):
    import keras
    import tensorflow as tf

    from ablations.probe import DrainCallback, ProbedModel

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16 * steps, *net.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, size=16 * steps)
    model = ProbedModel(net, capture=capture, capacity=4 * steps)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    drain = DrainCallback(drain_every=256, steps_per_epoch=steps)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0, callbacks=[drain],
              shuffle=False)
    return drain.tables(model)


def test_stochastic_depth_active_is_whether_the_branch_ran() -> None:
    """Batch mode: `active` is 0 exactly on the steps where the block's branch kernels got no gradient."""
    import keras

    import zoo

    keras.utils.set_random_seed(3)
    net = zoo.build("stochastic_depth_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=4, width=8,
                    survival_prob=0.3, survival_rule="uniform")
    t = _fit(net, {}, steps=12)
    b = t["blocks"].set_index(["step", "depth"])["active"]
    k = t["params"]
    k = k[(k["param"] == "kernel") & (k["layer"] == k["block"] + "_linear")].set_index(["step", "depth"])["grad_norm"]
    assert set(b.unique()) == {0.0, 1.0}  # both happened: the test can tell them apart
    for key, active in b.items():
        assert (k[key] == 0.0) == (active == 0.0), f"step/block {key}: active {active}, branch grad {k[key]}"


def test_history_lr_is_the_rate_applied_at_each_step() -> None:
    """Warm-up then cosine decay: the stored rate is the schedule at the step it was applied (by hand)."""
    import math

    import keras

    import zoo
    from ablations.config import OptimizerConfig
    from ablations.factories import make_optimizer

    steps, warm, peak = 8, 3, 0.1
    opt = make_optimizer(OptimizerConfig(name="sgd", learning_rate=peak,
                                         schedule={"name": "cosine", "warmup_steps": warm}), total_steps=steps)
    keras.utils.set_random_seed(0)
    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=8)
    lr = _fit(net, {}, steps=steps, optimizer=opt)["history"]["lr"].to_numpy()
    want = [peak * (s + 1) / warm if s < warm else
            peak * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))) for s in range(steps)]
    np.testing.assert_allclose(lr, want, rtol=1e-6)


def test_stored_decay_rate_is_the_least_squares_slope_of_the_stored_norms() -> None:
    import keras

    import zoo

    keras.utils.set_random_seed(0)
    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=5, width=8, activation="sigmoid")
    t = _fit(net, {}, steps=3)
    p = t["params"]
    for step, rate in t["history"].set_index("step")["grad_decay_rate"].items():
        k = p[(p["step"] == step) & (p["param"] == "kernel") & (p["layer"] == p["block"] + "_linear")]
        x, y = k["depth"].to_numpy(float), np.log10(k["grad_norm"].to_numpy(float))
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()  # closed form, by hand
        assert rate == pytest.approx(slope, rel=1e-9) and rate > 0.3  # sigmoid: a factor ~4 per block


def _adamw_biases_excluded():
    import keras

    opt = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    return opt


def _opt(name: str, *args, **kwargs):
    return lambda: getattr(__import__("keras").optimizers, name)(*args, **kwargs)


OPTIMIZERS = {
    "sgd": _opt("SGD", 0.05),
    "sgd+global_clipnorm": _opt("SGD", 0.05, global_clipnorm=0.5),
    "sgd+clipnorm": _opt("SGD", 0.05, clipnorm=0.05),
    "sgd+weight_decay": _opt("SGD", 0.05, weight_decay=0.1),
    "momentum": _opt("SGD", 0.05, momentum=0.9),
    "momentum+weight_decay+clipnorm": _opt("SGD", 0.05, momentum=0.9, weight_decay=0.1, clipnorm=0.05),
    "adam": _opt("Adam", 0.01),
    "adam+weight_decay": _opt("Adam", 0.01, weight_decay=0.05),
    "adamw": _opt("AdamW", 0.01, weight_decay=0.1),
    "adamw+biases_excluded": _adamw_biases_excluded,
    "rmsprop": _opt("RMSprop", 0.01),
    "rmsprop+weight_decay": _opt("RMSprop", 0.01, weight_decay=0.1),
    "rmsprop+centered+clipnorm": _opt("RMSprop", 0.01, centered=True, clipnorm=0.05),
    "rmsprop+global_clipnorm": _opt("RMSprop", 0.01, global_clipnorm=0.5),
    "rmsprop+momentum+weight_decay": _opt("RMSprop", 0.01, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_update_norms_read_from_the_optimizer_equal_the_copy_based_ones(opt: str) -> None:
    """Three steps with the update read from the optimizer's step (no copy) and with a pre-update copy."""
    import keras

    import zoo
    from ablations.instruments.param_norms import update_source

    tables = {}
    for source in ("slots", "copy"):
        keras.utils.set_random_seed(4)
        net = zoo.build("resnet_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=8, bias_init_std=0.1)
        tables[source] = _fit(net, {"instruments": {"param_norms": {"update_source": source}}}, steps=3,
                              optimizer=OPTIMIZERS[opt]())["params"]
    assert update_source(OPTIMIZERS[opt](), "auto") != "copy"
    a, b = tables["slots"]["update_norm"].to_numpy(), tables["copy"]["update_norm"].to_numpy()
    assert np.isfinite(a).all() and (a > 0).sum() > len(a) // 2
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-9)  # float32 rounding of the stored weights
    np.testing.assert_allclose(tables["slots"]["weight_norm"], tables["copy"]["weight_norm"], rtol=1e-6)


def test_optimizers_whose_update_cannot_be_read_exactly_keep_the_copy() -> None:
    import keras

    from ablations.instruments.param_norms import update_source

    for opt in (keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), keras.optimizers.Adagrad(0.01),
                keras.optimizers.SGD(0.1, clipvalue=0.1), keras.optimizers.RMSprop(0.01, clipvalue=0.1),
                keras.optimizers.Adam(0.01, amsgrad=True), keras.optimizers.AdamW(0.01, amsgrad=True),
                # the decay mixes into each entry before the norm that per-tensor clipping scales
                keras.optimizers.SGD(0.1, weight_decay=0.1, clipnorm=1.0),
                keras.optimizers.RMSprop(0.01, weight_decay=0.1, global_clipnorm=1.0),
                keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))):
        assert update_source(opt, "auto") == "copy", type(opt).__name__
        with pytest.raises(ValueError, match="slots cannot give the exact update"):
            update_source(opt, "slots")
