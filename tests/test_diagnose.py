"""Verdicts, the gradient-decay rate, architecture extras and capture under jit / steps_per_execution."""

from __future__ import annotations

import math

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import zoo
from ablations import measure
from ablations.diagnose import block_ranges, decay_rates, verdicts
from ablations.probe import DrainCallback, ProbedModel, measure_tables

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _batch(n=64, seed=0):
    rng = np.random.RandomState(seed)
    return rng.uniform(size=(n, 8, 8, 1)).astype(np.float32), rng.randint(0, 10, size=n)


def _tables_at_init(model, batch):
    """params/blocks/history tables of one measured batch, as the probe stores them (step 0; alpha, active and
    pre_layer included, so switched-off blocks are recognised as in a real run)."""
    t = measure_tables(model, batch, LOSS)
    return t["params"], t["blocks"], t["history"]


def _synthetic(grad_by_depth, update_ratio=1e-2, steps=range(10)):
    rows = []
    for step in steps:
        for d, g in enumerate(grad_by_depth):
            rows.append(dict(step=step, epoch=0, depth=d, block=f"block_{d:03d}", layer=f"block_{d:03d}_linear",
                             param="kernel", role="block", size=4, grad_norm=g, weight_norm=1.0,
                             update_norm=update_ratio, update_ratio=update_ratio))
    return pd.DataFrame(rows)


def test_decay_rate_is_the_least_squares_slope() -> None:
    grads = np.array([1e-6, 3e-5, 2e-4, 5e-3, 1e-2])
    rates = decay_rates(_synthetic(grads, steps=[0, 5]))
    want = -np.polyfit(np.arange(5.0), np.log10(grads), 1)[0]
    assert list(rates.index) == [0, 5]
    assert rates.iloc[0] == pytest.approx(-want, rel=1e-12)  # shrinking toward the input: positive
    assert rates.iloc[0] > 0


def test_block_ranges() -> None:
    assert block_ranges([0, 1, 2, 5, 7, 8]) == "blocks 0-2, 5, 7-8"
    assert block_ranges([3]) == "block 3"


def test_deep_sigmoid_plain_is_vanishing_rezero_is_not() -> None:
    keras.utils.set_random_seed(0)
    b = _batch()
    plain = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=20, width=32, activation="sigmoid")
    v = verdicts(*_tables_at_init(plain, b), at_init=True)
    vanishing = [x for x in v if x["kind"] == "vanishing"]
    assert vanishing, v
    assert 0 in vanishing[0]["blocks"] and "first/last ratio" in vanishing[0]["message"]
    res = zoo.build("resnet_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=20, width=32, activation="sigmoid",
                    branch_scale="inv_sqrt_depth")
    assert not [x for x in verdicts(*_tables_at_init(res, b), at_init=True) if x["kind"] == "vanishing"]
    # ReZero once alpha has moved: judged, and its identity skips keep the ratio near 1.
    moved = zoo.build("rezero_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=20, width=32, activation="sigmoid",
                      alpha_init=0.05)
    params, blocks, history = _tables_at_init(moved, b)
    assert (blocks["alpha"] == 0.05).all() and (params.loc[params.role == "block", "grad_norm"] > 0).all()
    assert verdicts(params, blocks, history, at_init=True) == []
    # At alpha = 0 every branch kernel has exactly zero gradient by design: nothing to judge, no verdict
    # (without the alpha column the zeros read as vanishing: this assertion can fail).
    init = zoo.build("rezero_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=20, width=32, activation="sigmoid")
    params, blocks, history = _tables_at_init(init, b)
    assert verdicts(params, blocks, history, at_init=True) == []
    assert [x["kind"] for x in verdicts(params, blocks.drop(columns="alpha"), history, at_init=True)] == ["vanishing"]


def test_exploding_stalled_plateau_and_nonfinite() -> None:
    grads = [500.0, 100.0, 10.0, 1.0]
    v = {x["kind"]: x for x in verdicts(_synthetic(grads, update_ratio=1e-5), pd.DataFrame(),
                                         pd.DataFrame({"step": range(10), "loss": [2.0] * 10}))}
    assert v["exploding"]["blocks"] == [0, 1]  # 500x and 100x the last block's gradient, > 70
    assert v["stalled"]["blocks"] == [0, 1, 2, 3] and "< 0.001" in v["stalled"]["message"]
    assert "plateau" in v
    nan = _synthetic([1.0, float("nan")])
    assert [x["kind"] for x in verdicts(nan, pd.DataFrame(), pd.DataFrame())] == ["exploding"]
    healthy = verdicts(_synthetic([1.0, 1.2, 0.9]), pd.DataFrame(),
                       pd.DataFrame({"step": range(10), "loss": np.linspace(2, 1, 10)}))
    assert healthy == []


def test_stalled_needs_a_few_captured_steps_not_one_update() -> None:
    from ablations.diagnose import STALL_MIN_STEPS

    def stalled(steps):
        return [x for x in verdicts(_synthetic([1.0, 1.0], update_ratio=1e-5, steps=steps), pd.DataFrame(),
                                    pd.DataFrame()) if x["kind"] == "stalled"]

    assert stalled([0]) == [] and stalled(range(STALL_MIN_STEPS - 1)) == []
    (v,) = stalled(range(STALL_MIN_STEPS))
    assert v["message"].endswith(f"over the last {STALL_MIN_STEPS} steps")


def test_thresholds_are_overridable() -> None:
    p = _synthetic([1e-2, 1.0])
    assert [x["kind"] for x in verdicts(p, pd.DataFrame(), pd.DataFrame())] == []
    assert [x["kind"] for x in verdicts(p, pd.DataFrame(), pd.DataFrame(), {"vanishing_ratio": 0.1})] == ["vanishing"]


def test_saturated_and_dead_blocks() -> None:
    keras.utils.set_random_seed(0)
    b = _batch()
    sat = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=3, width=32, activation="sigmoid",
                    initializer="variance_scaling", initializer_options={"scale": 1e4})
    kinds = {x["kind"]: x for x in verdicts(*_tables_at_init(sat, b), at_init=True)}
    assert "saturated" in kinds and 1 in kinds["saturated"]["blocks"]
    dead = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=16, activation="relu")
    layer = dead.get_layer("block_001_linear")
    layer.bias.assign(-100.0 * np.ones(16, np.float32))  # every unit of block 1 is off for every example
    kinds = {x["kind"]: x for x in verdicts(*_tables_at_init(dead, b), at_init=True)}
    assert kinds["dead_units"]["blocks"] == [1] and "100%" in kinds["dead_units"]["message"]


def test_branch_ratio_matches_independent_norms() -> None:
    keras.utils.set_random_seed(3)
    model = zoo.build("resnet_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=3, width=16, activation="tanh",
                      branch_scale=0.5)
    x, y = _batch(32)
    adds = [model.get_layer(f"block_{i:03d}_add") for i in range(3)]
    view = keras.Model(model.inputs, [t for a in adds for t in a.input])
    outs = [o.numpy() for o in view(x)]
    want = [np.linalg.norm(outs[2 * i + 1]) / np.linalg.norm(outs[2 * i]) for i in range(3)]
    df = measure(model, (x, y), LOSS)
    got = df[df.role == "block"].groupby("depth")["branch_ratio"].first().to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert df["gate_mean"].isna().all()  # no highway gates in a ResNet


def test_gate_mean_matches_the_gate_outputs() -> None:
    keras.utils.set_random_seed(4)
    model = zoo.build("highway_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=3, width=16, gate_bias=-1.0)
    x, y = _batch(32)
    gates = [model.get_layer(f"block_{i:03d}_gate") for i in range(3)]
    outs = keras.Model(model.inputs, [g.output for g in gates])(x)
    want = [float(np.mean(o.numpy().astype(np.float64))) for o in outs]
    df = measure(model, (x, y), LOSS)
    got = df[df.role == "block"].groupby("depth")["gate_mean"].first().to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(want, want[0])  # the blocks differ: a mixed-up row would show
    assert df["branch_ratio"].isna().all() and df["alpha"].isna().all()


def _probe_run(jit: bool, spe: int, every: int, batches: int = 8, model_out: list | None = None):
    keras.utils.set_random_seed(7)
    net = zoo.build("resnet_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=8, activation="tanh")
    model = ProbedModel(net, every=every, capacity=32)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, steps_per_execution=spe, jit_compile=jit)
    x, y = _batch(8 * batches)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # `batches` steps per epoch
    drain = DrainCallback(drain_every=4, steps_per_epoch=batches)
    model.fit(ds, epochs=2, callbacks=[drain], verbose=0, shuffle=False)
    if model_out is not None:
        model_out.append(model)
    return drain.tables(model), drain


@pytest.mark.parametrize("jit,spe", [(True, 1), (False, 4)])
def test_jit_and_steps_per_execution_match_plain_capture(jit: bool, spe: int, no_op_determinism) -> None:
    import warnings

    ref, _ = _probe_run(False, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Model doesn't support jit_compile" must not happen
        got, drain = _probe_run(jit, spe, 2)
    assert list(got["history"].step) == list(range(0, 16, 2))  # every 2nd step, across epochs
    assert drain.lost == 0
    for name in ("params", "blocks"):
        cols = [c for c in got[name].columns if got[name][c].dtype.kind == "f"]
        np.testing.assert_allclose(got[name][cols].to_numpy(), ref[name][cols].to_numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batches,jit,every", [(8, False, 4), (9, False, 4), (9, True, 4), (8, False, 2),
                                               (7, False, 2), (9, False, 3), (9, False, 8), (7, False, 8)])
def test_an_execution_that_starts_on_a_captured_step_runs_it_then_plain_steps(batches: int, jit: bool, every: int,
                                                                              no_op_determinism) -> None:
    """steps_per_execution 4, every 4: one probed step, then 3 plain ones per execution (one call); every 2: two
    groups of a probed and a plain step. With 9 batches (every 4) or 7 (every 2) an epoch ends right after a probed
    step (its plain steps have no data), and the second epoch starts off the grid: its executions run plain steps
    before their first captured one, still one call. every 3 divides no execution of 4 steps; every 8 captures in
    every other one (mid-way from epoch 2 with 7 or 9 batches). No execution takes the probed function's per-step
    tf.cond; all equal to spe 1."""
    models: list = []
    ref, _ = _probe_run(False, 1, every, batches, models)
    got, drain = _probe_run(jit, 4, every, batches, models)  # jit: each step XLA-compiled, as Keras does its own
    plain_run, mixed_run = models
    calls = mixed_run.train_function.fn_calls
    assert mixed_run.train_function.mixed is not None and calls["probed"] == 0 and calls["mixed"] >= 1
    assert (calls["mixed off grid"] > 0) == (batches % 4 != 0 or every == 3)
    assert list(got["history"].step) == list(range(0, 2 * batches, every)) and drain.lost == 0
    for name in ("history", "params", "blocks"):
        cols = [c for c in got[name].columns if got[name][c].dtype.kind == "f"]
        np.testing.assert_allclose(got[name][cols].to_numpy(), ref[name][cols].to_numpy(), rtol=1e-5, atol=1e-7)
    assert int(mixed_run.optimizer.iterations.numpy()) == 2 * batches
    for a, b in zip(plain_run.trainable_variables, mixed_run.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_ring_buffer_is_bounded_by_the_drain_interval() -> None:
    (_, drain) = _probe_run(False, 1, 1)
    # 16 captures through a 32-slot buffer drained every 4 steps: nothing lost, memory fixed at creation.
    assert drain.lost == 0 and sum(len(s) for s in drain.steps[1]) == 16
    from ablations.probe import ring_capacity

    assert ring_capacity(1, 256, 10_000, 1) == ring_capacity(1, 256, 1_000_000, 1)
    assert math.isfinite(ring_capacity(16, 256, 22, 16))


def test_switched_off_stochastic_depth_blocks_are_not_vanishing() -> None:
    """Batch-mode stochastic depth: a dropped branch has exactly zero gradient at that step, by design."""
    from ablations.diagnose import gradient_summary

    params = _synthetic([1.0, 1.0, 1.0, 1.0], steps=range(4))
    off = (params["depth"] == 0) & params["step"].isin([0, 1, 3])  # block 0 dropped at steps 0, 1 and 3
    params.loc[off, ["grad_norm", "update_norm", "update_ratio"]] = 0.0
    blocks = pd.DataFrame([dict(step=s, epoch=0, depth=d, block=f"block_{d:03d}",
                                active=0.0 if (d == 0 and s in (0, 1, 3)) else 1.0)
                           for s in range(4) for d in range(4)])
    assert verdicts(params, blocks, pd.DataFrame()) == []  # nothing at all: no stalled, no NaN "exploding"
    assert [v["kind"] for v in verdicts(params, blocks.drop(columns="active"), pd.DataFrame())].count("vanishing") == 1
    s = gradient_summary(params, blocks)
    assert math.isnan(s["ratio_init"]) and math.isnan(s["ratio_final"])  # undefined, not 0
    assert s["decay_rate_init"] == pytest.approx(0.0, abs=1e-12)  # from the three blocks that were on
    assert gradient_summary(params)["ratio_init"] == 0.0  # without the blocks table: the raw zeros
    assert (params.loc[off, "grad_norm"] == 0).all()  # the caller's table is left as stored
    # ReZero at init: alpha = 0 leaves the branch kernels without gradient; from step 1 on they are judged.
    rezero = blocks.drop(columns="active").assign(alpha=np.where(blocks["step"] == 0, 0.0, 0.1))
    p0 = _synthetic([0.0, 0.0, 0.0, 0.0], steps=[0])
    p0 = pd.concat([p0, _synthetic([1e-6, 1.0, 1.0, 1.0], steps=[1, 2, 3])], ignore_index=True)
    assert math.isnan(gradient_summary(p0, rezero)["ratio_init"])
    assert gradient_summary(p0, rezero)["ratio_final"] == pytest.approx(1e-6)
