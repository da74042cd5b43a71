"""The dispatcher's choice of compiled function per execution and its self-measured ``capture_cost``.

The compiled functions are stand-ins that advance a fake clock by a known, varying time, so each figure of
``cost()`` is checked against the same figure computed here from the calls' own durations.
"""

from __future__ import annotations

import numpy as np
import pytest

from ablations.probe import dispatch
from ablations.probe.dispatch import WARMUP_CALLS, Dispatcher


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake(clock: _Clock, kind: str, log: list, seconds, timing=None):
    """A compiled function taking ``seconds(call)``; a one-call execution also returns its in-graph ``timing``
    and logs itself as "mixed" or, given a lead (its first captured step mid-way), as "mixed off grid"."""
    def run(iterator, lead=None):
        duration = seconds(len(log))
        log.append((kind if not lead else "mixed off grid", duration))
        clock.now += duration
        if kind != "mixed":
            return {"kind": kind}
        run.leads.append(lead)
        return {"kind": kind}, None if timing is None else _Tensor(timing(len(run.leads) - 1))
    run.leads = []
    return run


class _Tensor:
    """What the execution returns for its timing: a tensor the dispatcher reads with ``numpy()``."""

    def __init__(self, values):
        self.values = np.asarray(values, np.float64)

    def numpy(self):
        return self.values


def _dispatcher(monkeypatch, every: int, k: int, mixed: bool = False, start: int = 0, timing=None,
                untimed: str | None = None):
    clock = _Clock()
    monkeypatch.setattr(dispatch.time, "perf_counter", clock)
    log: list = []
    plain = _fake(clock, "plain", log, lambda i: 0.010 + 0.001 * (i % 3))
    probed = _fake(clock, "probed", log, lambda i: 0.030 + 0.002 * (i % 5))
    both = _fake(clock, "mixed", log, lambda i: 0.050 + 0.003 * (i % 2), timing) if mixed else None
    step = {"value": start}
    return Dispatcher(plain, probed, every, k, lambda: step["value"], mixed=both, untimed=untimed), log, step


def _expected_cost(log, k: int) -> dict:
    """ms per step of each kind, leaving out each compiled function's first WARMUP_CALLS calls (the one-call
    execution and the probed function are both of the probed kind), computed from the log."""
    timed = {"plain": [], "probed": []}
    seen = {"plain": 0, "probed": 0, "mixed": 0, "mixed off grid": 0}
    for fn, duration in log:
        seen[fn] += 1
        if seen[fn] > WARMUP_CALLS:
            timed["plain" if fn == "plain" else "probed"].append(duration)
    plain = 1e3 * sum(timed["plain"]) / (len(timed["plain"]) * k)
    probed = 1e3 * sum(timed["probed"]) / (len(timed["probed"]) * k)
    total = 1e3 * (sum(timed["plain"]) + sum(timed["probed"]))
    steps = k * (len(timed["plain"]) + len(timed["probed"]))
    return {"plain": plain, "probed": probed, "ratio": probed / plain, "run": total / (steps * plain)}


@pytest.mark.parametrize("every,k,mixed", [(4, 1, False), (3, 1, False), (8, 2, False), (32, 4, True),
                                           (12, 8, True), (5, 3, True)])
def test_each_execution_runs_the_function_its_steps_need_and_cost_matches_the_calls(monkeypatch, every, k, mixed):
    """Executions that capture mid-way (12 and 8, 5 and 3) run the one-call execution told where."""
    d, log, _ = _dispatcher(monkeypatch, every, k, mixed)
    iterator = object()
    calls = 48
    for _ in range(calls):
        d(iterator)
    leads = []
    for i, (kind, _) in enumerate(log):
        start = i * k
        captured = [s - start for s in range(start, start + k) if s % every == 0]
        want = "plain"
        if captured:
            want = ("mixed" if captured[0] == 0 else "mixed off grid") if mixed else "probed"
            leads.append(captured[0])
        assert kind == want, (i, kind, want)
    assert not mixed or leads == d.mixed.leads
    cost, want = d.cost(), _expected_cost(log, k)
    assert cost["plain_ms_per_step"] == pytest.approx(want["plain"])
    assert cost["probed_ms_per_step"] == pytest.approx(want["probed"])
    assert cost["probed_over_plain"] == pytest.approx(want["ratio"])
    assert cost["run_over_plain"] == pytest.approx(want["run"])
    probed_calls = sum(kind != "plain" for kind, _ in log)
    assert (cost["probed_executions"], cost["plain_executions"]) == (probed_calls, calls - probed_calls)
    assert d.mixed_calls == sum(kind.startswith("mixed") for kind, _ in log)


def test_a_new_iterator_resumes_the_count_from_the_optimizers_step(monkeypatch):
    d, log, step = _dispatcher(monkeypatch, every=4, k=1)
    first = object()
    for _ in range(3):  # steps 0, 1, 2
        d(first)
    step["value"] = 6  # e.g. a resumed fit, or a short last execution the host count did not see
    second = object()
    for _ in range(3):  # steps 6, 7, 8
        d(second)
    assert [kind for kind, _ in log] == ["probed", "plain", "plain", "plain", "plain", "probed"]


@pytest.mark.parametrize("every,k,mixed,phrase", [
    (1, 1, False, "every step is captured"),
    (16, 16, True, "every execution holds a captured step (capture.every 16 <= steps_per_execution 16): no plain "
                   "executions to compare with, and its steps are not timed in the graph: on a GPU"),
    (4, 8, True, "not timed in the graph: on a GPU"),
    (3, 8, True, "not timed in the graph: on a GPU")])
def test_without_plain_executions_cost_says_why_instead_of_a_ratio(monkeypatch, every, k, mixed, phrase):
    d, log, _ = _dispatcher(monkeypatch, every, k, mixed=mixed, untimed="on a GPU" if mixed else None)
    iterator = object()
    for _ in range(12):
        d(iterator)
    assert {kind for kind, _ in log} <= {"probed", "mixed", "mixed off grid"}
    cost = d.cost()
    assert cost["plain_ms_per_step"] is None and cost["probed_over_plain"] is None
    assert cost["run_over_plain"] is None
    assert phrase in cost["note"]
    assert cost["probed_ms_per_step"] == pytest.approx(_expected_probed(log, k))


def _expected_probed(log, k: int) -> float:
    """Only probed executions ran: each compiled function's (each trace's) first calls left out."""
    seen: dict = {}
    timed = [d for fn, d in log if seen.setdefault(fn, []).append(d) or len(seen[fn]) > WARMUP_CALLS]
    return 1e3 * sum(timed) / (len(timed) * k)


def _timing(k: int, size: int):
    """Call c's in-graph timing: [captured seconds, plain seconds, captured steps, plain steps], varying by call."""
    groups = k // size
    return lambda c: [groups * (0.020 + 0.001 * (c % 4)), groups * (size - 1) * (0.008 + 0.0005 * (c % 3)),
                      groups, groups * (size - 1)]


@pytest.mark.parametrize("every,k", [(16, 16), (4, 8), (2, 8)])
def test_without_plain_executions_in_graph_timing_gives_the_ratio(monkeypatch, every, k):
    """every <= k: the one-call executions' own clock reads stand in for plain executions (first calls left out)."""
    timing = _timing(k, every)
    d, log, _ = _dispatcher(monkeypatch, every, k, mixed=True, timing=timing)
    iterator = object()
    calls = 12
    for _ in range(calls):
        d(iterator)
    assert {kind for kind, _ in log} == {"mixed"}
    rows = np.array([timing(c) for c in range(WARMUP_CALLS, calls)])
    captured_s, plain_s, n_captured, n_plain = rows.sum(axis=0)
    plain, captured = 1e3 * plain_s / n_plain, 1e3 * captured_s / n_captured
    per_step = 1e3 * (captured_s + plain_s) / (n_captured + n_plain)
    cost = d.cost()
    assert cost["timed"] == "in-graph" and "note" not in cost
    assert cost["plain_ms_per_step"] == pytest.approx(plain)
    assert cost["probed_ms_per_step"] == pytest.approx(per_step)
    assert cost["probed_over_plain"] == pytest.approx(per_step / plain)
    assert cost["run_over_plain"] == pytest.approx(per_step / plain)
    graph = cost["in_graph"]
    assert graph["captured_ms_per_step"] == pytest.approx(captured)
    assert graph["captured_over_plain"] == pytest.approx(captured / plain)
    assert (graph["captured_steps"], graph["plain_steps"]) == (n_captured, n_plain)
    host_s = sum(duration for _, duration in log[WARMUP_CALLS:])  # the same calls on the fake clock
    assert graph["host_ms_per_step"] == pytest.approx(1e3 * host_s / (n_captured + n_plain))
    assert (graph["captured_steps"], graph["plain_steps"]) == ((calls - WARMUP_CALLS) * k // every,
                                                               (calls - WARMUP_CALLS) * (k - k // every))


def test_host_timing_wins_where_plain_executions_ran(monkeypatch):
    """every a multiple of k: plain executions exist, so the ratio is the host's; the in-graph one is extra."""
    d, log, _ = _dispatcher(monkeypatch, 32, 4, mixed=True, timing=_timing(4, 4))
    iterator = object()
    for _ in range(48):
        d(iterator)
    cost, want = d.cost(), _expected_cost(log, 4)
    assert cost["timed"] == "host" and cost["probed_over_plain"] == pytest.approx(want["ratio"])
    assert cost["in_graph"]["captured_steps"] == d.mixed_calls - WARMUP_CALLS


class _Steps:
    """The model interface :func:`captured_execution` reads: one step does ~1 GFLOP of matmuls, the other one
    add, both updating a variable as a training step does (the clock reads must wait for those updates); each
    step also appends its kind to ``pattern`` (a bit: 1 captured, 0 plain), so the order of steps can be read."""

    distribute_strategy = None
    run_eagerly = False
    jit_compile = False

    def __init__(self, heavy_captured: bool):
        import tensorflow as tf

        self.distribute_strategy = tf.distribute.get_strategy()
        self.done = tf.Variable(0.0, dtype=tf.float64)
        self.pattern = tf.Variable(1, dtype=tf.int64)  # a leading 1, then one bit per step
        self.total = tf.Variable(0.0)  # the matmuls feed it: a result nothing stateful reads would be pruned
        self.w = tf.constant(np.random.default_rng(0).normal(0, 0.06, (256, 256)), tf.float32)
        heavy, light = self._heavy, self._light
        captured, plain = (heavy, light) if heavy_captured else (light, heavy)
        self.captured_train_step = lambda x: self._mark(1, captured, x)
        self.plain_train_step = lambda x: self._mark(0, plain, x)

    def steps(self) -> str:
        """The kinds of the steps since the last call, in order: "1" captured, "0" plain."""
        bits = bin(int(self.pattern.numpy()))[3:]
        self.pattern.assign(1)
        return bits

    def _mark(self, bit: int, step, x):
        self.pattern.assign(self.pattern * 2 + bit)
        return step(x)

    def _heavy(self, x):
        import tensorflow as tf

        h = tf.tile(tf.reshape(x, [1, 1]), [256, 256])
        for _ in range(30):
            h = tf.tanh(h @ self.w)
        self.total.assign_add(tf.reduce_sum(h))
        self.done.assign_add(1.0)
        return {"loss": tf.reduce_sum(h)}

    def _light(self, x):
        self.done.assign_add(1.0)
        return {"loss": x}


@pytest.mark.parametrize("heavy_captured", [True, False])
@pytest.mark.parametrize("batches,every,lead,want", [
    (8, 4, 0, "10001000"), (5, 4, 0, "10001"), (8, 8, 0, "10000000"), (3, 8, 0, "100"),
    (8, 4, 3, "00010001"), (8, 8, 5, "00000100"), (6, 8, 5, "000001"), (3, 8, 5, "000"), (8, 3, 2, "00100100")])
def test_a_one_call_execution_times_its_captured_and_plain_steps_in_the_graph(heavy_captured, batches, every, lead,
                                                                              want, no_op_determinism):
    """k = 8: the steps run in the order the capture grid says, from the first captured step at ``lead`` (an
    execution off the grid, as after an epoch of 23 steps at k 16); the clock reads sit between the steps (the
    heavy kind reads > 5x the light one per step, whichever it is); the counts follow the steps and a short last
    execution, and the total fits in the call's time."""
    import time

    import tensorflow as tf

    from ablations.probe.execution import captured_execution

    steps = _Steps(heavy_captured)
    run = captured_execution(steps, 8, every, timed=True)
    data = tf.data.Dataset.range(batches).map(lambda i: tf.cast(i, tf.float32))
    run(iter(data), lead)  # trace and warm up
    assert steps.steps() == want
    per_step, counts = [], set()
    for _ in range(3):  # the least of three per kind: a preemption on a busy machine lands in one run, not all
        t0 = time.perf_counter()
        _, timing = run(iter(data), lead)
        wall = time.perf_counter() - t0
        captured_s, plain_s, n_captured, n_plain = timing.numpy()
        assert 0 < captured_s + plain_s <= wall  # inside the call
        assert captured_s >= 0 and (n_captured or captured_s == 0)  # a light step can read 0 (1 us resolution)
        per_step.append((captured_s / max(n_captured, 1), plain_s / n_plain))
        counts.add((n_captured, n_plain))
    assert counts == {(want.count("1"), want.count("0"))} and steps.done.numpy() == 4 * batches
    if "1" in want:
        heavy, light = np.min(per_step, axis=0)[::1 if heavy_captured else -1]
        # One light step can read 0: it takes about the clock's resolution (1 us).
        assert heavy > 5 * light and heavy > 1e-4
    assert captured_execution(steps, 8, every)(iter(data), lead)[1] is None  # untimed: no clock in the graph
    assert steps.steps() == want * 4


def _arm_page(cost: dict) -> str:
    from ablations.report import environment

    row = {"arm": "a", "status": "completed", "seed": 0, "time": 1.0, "note": ""}
    html = environment().get_template("arm.html").render(
        name="r", row=row, summary={"capture_cost": cost}, figures=[], error=None, problems=[], config="",
        prev=None, next=None, home="", up="")
    return " ".join(html.split())


def test_the_arm_page_says_how_the_capture_cost_was_timed(monkeypatch):
    """The figures of cost() reach the arm page, with the captured step's own time when timed in the graph."""
    d, _, _ = _dispatcher(monkeypatch, 16, 16, mixed=True, timing=_timing(16, 16))
    iterator = object()
    for _ in range(6):
        d(iterator)
    cost = d.cost()
    page = _arm_page(cost)
    assert "the steps of 4 of its 6 executions were timed in the graph" in page  # the first 2 left out
    assert f"{cost['in_graph']['captured_ms_per_step']:.3g} ms per captured step" in page
    assert f"{cost['plain_ms_per_step']:.3g} ms per plain step" in page
    assert f"took {cost['run_over_plain']:.3f}x" in page
    d, _, _ = _dispatcher(monkeypatch, 8, 2)  # host-timed: plain executions ran
    for _ in range(24):
        d(iterator)
    page = _arm_page(d.cost())
    assert "measured from its own steps" in page and "per captured step" not in page
    d, _, _ = _dispatcher(monkeypatch, 16, 16, mixed=True, untimed="on a GPU")  # untimed: the note instead
    for _ in range(6):
        d(iterator)
    assert "every execution holds a captured step" in _arm_page(d.cost())


@pytest.fixture
def determinism():
    """Op determinism on for the test (as `runtime.deterministic: true` sets it), restored after."""
    from ablations.compat import op_determinism_enabled
    from ablations.strategy import set_op_determinism

    was = op_determinism_enabled()
    set_op_determinism(True)
    yield
    set_op_determinism(was)


def _small_fit(every: int, examples: int, epochs: int):
    """A 2-block MLP probed every ``every`` steps at k 4, fitted on batches of 8 of ``examples`` examples."""
    import keras
    import tensorflow as tf

    import zoo
    from ablations.probe import ProbedModel

    keras.utils.set_random_seed(3)
    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=16)
    model = ProbedModel(net, every=every, capacity=32)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy", steps_per_execution=4)
    rng = np.random.default_rng(0)
    x, y = rng.random((examples, 8, 8, 1), np.float32), rng.integers(0, 10, examples)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=epochs, verbose=0, shuffle=False)
    return model


def _fit_every_4_spe_4():
    # 16 steps an epoch: 8 executions, each 1 captured + 3 plain
    return _small_fit(4, 128, 2).train_function.cost()


def test_a_fit_with_every_equal_to_spe_records_its_cost_timed_in_the_graph(no_op_determinism):
    cost = _fit_every_4_spe_4()
    assert cost["timed"] == "in-graph" and cost["plain_executions"] == 0 and cost["probed_executions"] == 8
    graph = cost["in_graph"]
    assert (graph["captured_steps"], graph["plain_steps"]) == (8 - WARMUP_CALLS, 3 * (8 - WARMUP_CALLS))
    assert 0 < graph["ms_per_step"] <= graph["host_ms_per_step"]  # inside the calls the host timed
    assert cost["run_over_plain"] > 0 and "note" not in cost


def test_with_op_determinism_the_fit_runs_untimed_and_says_why(determinism):
    """tf.timestamp fails under op determinism (FailedPrecondition): the executions run without the clock."""
    cost = _fit_every_4_spe_4()
    assert "in_graph" not in cost and cost["run_over_plain"] is None
    assert "not timed in the graph: TF op determinism is on (runtime.deterministic: true)" in cost["note"]


def test_executions_off_the_capture_grid_are_timed_too(monkeypatch):
    """Resumed at step 8 with every 16, k 16: each execution captures mid-way, one call told so, timed."""
    d, log, _ = _dispatcher(monkeypatch, 16, 16, mixed=True, timing=_timing(16, 16), start=8)
    iterator = object()
    for _ in range(6):
        d(iterator)
    assert {kind for kind, _ in log} == {"mixed off grid"} and d.mixed.leads == [8] * 6
    cost = d.cost()
    assert cost["timed"] == "in-graph" and cost["in_graph"]["executions"] == 6 - WARMUP_CALLS


def test_each_compiled_function_leaves_out_its_own_first_calls(monkeypatch):
    """Off the capture grid first (resumed at step 2: the one-call execution's trace with a lead), then on it
    (its trace without): both trace on their first calls, so each one's first WARMUP_CALLS are left out."""
    d, log, step = _dispatcher(monkeypatch, 16, 4, mixed=True, start=2)
    first = object()
    for _ in range(15):  # steps 2..61: executions holding 16, 32 and 48 capture mid-way
        d(first)
    step["value"] = 64  # not 62: a count behind the optimizer's step is a resumed fit, not a short execution
    second = object()
    for _ in range(16):  # steps 64..127 on the grid: the one-call execution
        d(second)
    assert {"mixed off grid", "mixed", "plain"} == {fn for fn, _ in log}
    cost, want = d.cost(), _expected_cost(log, 4)
    assert cost["probed_ms_per_step"] == pytest.approx(want["probed"])
    assert cost["run_over_plain"] == pytest.approx(want["run"])


@pytest.mark.parametrize("every,k,batches", [(32, 16, 23), (48, 16, 40), (8, 4, 6)])
def test_an_execution_the_data_ends_mid_way_is_timed_by_the_steps_it_ran(monkeypatch, every, k, batches):
    """Finite epochs of ``batches`` batches: each epoch's last execution runs fewer than k steps. The fakes take
    a fixed time per step of their kind, so the ms per step recorded must be exactly that, whatever the mix."""
    clock = _Clock()
    monkeypatch.setattr(dispatch.time, "perf_counter", clock)
    step, left, kinds = {"value": 0}, {"n": 0}, []
    per_step = {"plain": 0.004, "probed": 0.011}

    def fake(kind):
        def run(iterator):
            ran = min(k, left["n"])  # Keras' loop stops where the epoch's data ends
            left["n"] -= ran
            step["value"] += ran
            clock.now += ran * per_step[kind]
            kinds.append((kind, ran))
            return {}
        return run

    d = Dispatcher(fake("plain"), fake("probed"), every, k, lambda: step["value"])
    for _ in range(6):  # epochs: a new iterator each, as Keras makes for a finite dataset
        iterator, left["n"] = object(), batches
        while left["n"]:
            d(iterator)
    assert any(ran < k for _, ran in kinds) and {kind for kind, _ in kinds} == {"plain", "probed"}
    cost = d.cost()
    assert cost["plain_ms_per_step"] == pytest.approx(1e3 * per_step["plain"])
    assert cost["probed_ms_per_step"] == pytest.approx(1e3 * per_step["probed"])
    seen, spent, steps = {"plain": 0, "probed": 0}, 0.0, 0  # each kind's first WARMUP_CALLS left out
    for kind, ran in kinds:
        seen[kind] += 1
        if seen[kind] > WARMUP_CALLS:
            spent, steps = spent + ran * per_step[kind], steps + ran
    assert cost["run_over_plain"] == pytest.approx(spent / (steps * per_step["plain"]))


def test_a_real_fit_counts_the_steps_of_the_executions_its_epochs_end(determinism):
    """Keras ends an execution where a finite epoch's data ends (7 batches, k 4: 4 steps then 3). Executions:
    [0,4) one call on the grid, [4,7) plain, then from epoch 2 one call off the grid ([7,11) captures step 8),
    3 plain steps, and so on; each compiled function's first WARMUP_CALLS calls are not timed."""
    model = _small_fit(8, 56, 4)
    d = model.train_function
    assert d.fn_calls == {"plain": 4, "probed": 0, "mixed": 1, "mixed off grid": 3}
    cost = d.cost()
    assert d.next_step == int(model.optimizer.iterations.numpy()) == 28
    assert d.timed_steps == {"plain": 3 + 3, "probed": 4}  # the 3rd and 4th plain calls; the 3rd off-grid call
    assert cost["plain_ms_per_step"] == pytest.approx(1e3 * d.time["plain"] / 6)


def test_a_captured_step_off_the_capture_grid_records_nothing():
    """The one-call execution's captured step has no tf.cond on the step around it; its ring write still checks
    the step is due, so a host count gone wrong can lose a capture but never record one off the grid."""
    import keras
    import tensorflow as tf

    import zoo
    from ablations.probe import ProbedModel

    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=2, width=16)
    model = ProbedModel(net, every=4, capacity=8)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).random((8, 8, 8, 1), np.float32), np.arange(8) % 10
    step = tf.function(model.captured_train_step)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds; captures step 0
    for _ in range(6):  # optimizer steps 1..6: only 4 is due
        step((tf.constant(x), tf.constant(y)))
    buf = model.ring.read()
    assert buf["counts"] == {4: 2} and list(buf["steps"][4][:2]) == [0, 4]
