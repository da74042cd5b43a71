"""The dispatcher's choice of compiled function per execution and its self-measured ``capture_cost``.

The compiled functions are stand-ins that advance a fake clock by a known, varying time, so each figure of
``cost()`` is checked against the same figure computed here from the calls' own durations.
"""

from __future__ import annotations

import pytest

from ablations.probe import dispatch
from ablations.probe.dispatch import WARMUP_CALLS, Dispatcher


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake(clock: _Clock, kind: str, log: list, seconds):
    def run(iterator):
        duration = seconds(len(log))
        log.append((kind, duration))
        clock.now += duration
        return {"kind": kind}
    return run


def _dispatcher(monkeypatch, every: int, k: int, mixed: bool = False, start: int = 0):
    clock = _Clock()
    monkeypatch.setattr(dispatch.time, "perf_counter", clock)
    log: list = []
    plain = _fake(clock, "plain", log, lambda i: 0.010 + 0.001 * (i % 3))
    probed = _fake(clock, "probed", log, lambda i: 0.030 + 0.002 * (i % 5))
    both = _fake(clock, "mixed", log, lambda i: 0.050 + 0.003 * (i % 2)) if mixed else None
    step = {"value": start}
    return Dispatcher(plain, probed, every, k, lambda: step["value"], mixed=both), log, step


def _expected_cost(log, k: int) -> dict:
    """ms per step of each kind, leaving out each kind's first WARMUP_CALLS calls, computed from the log."""
    timed = {"plain": [], "probed": []}
    seen = {"plain": 0, "probed": 0}
    for kind, duration in log:
        kind = "probed" if kind == "mixed" else kind
        seen[kind] += 1
        if seen[kind] > WARMUP_CALLS:
            timed[kind].append(duration)
    plain = 1e3 * sum(timed["plain"]) / (len(timed["plain"]) * k)
    probed = 1e3 * sum(timed["probed"]) / (len(timed["probed"]) * k)
    total = 1e3 * (sum(timed["plain"]) + sum(timed["probed"]))
    steps = k * (len(timed["plain"]) + len(timed["probed"]))
    return {"plain": plain, "probed": probed, "ratio": probed / plain, "run": total / (steps * plain)}


@pytest.mark.parametrize("every,k,mixed", [(4, 1, False), (3, 1, False), (8, 2, False), (32, 4, True)])
def test_each_execution_runs_the_function_its_steps_need_and_cost_matches_the_calls(monkeypatch, every, k, mixed):
    d, log, _ = _dispatcher(monkeypatch, every, k, mixed)
    iterator = object()
    calls = 48
    for _ in range(calls):
        d(iterator)
    for i, (kind, _) in enumerate(log):
        start = i * k
        captures = any(s % every == 0 for s in range(start, start + k))
        want = ("mixed" if mixed and start % every == 0 else "probed") if captures else "plain"
        assert kind == want, (i, kind, want)
    cost, want = d.cost(), _expected_cost(log, k)
    assert cost["plain_ms_per_step"] == pytest.approx(want["plain"])
    assert cost["probed_ms_per_step"] == pytest.approx(want["probed"])
    assert cost["probed_over_plain"] == pytest.approx(want["ratio"])
    assert cost["run_over_plain"] == pytest.approx(want["run"])
    probed_calls = sum(kind != "plain" for kind, _ in log)
    assert (cost["probed_executions"], cost["plain_executions"]) == (probed_calls, calls - probed_calls)
    assert d.mixed_calls == sum(kind == "mixed" for kind, _ in log)


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


@pytest.mark.parametrize("every,k,phrase", [(1, 1, "every step is captured"),
                                            (16, 16, "every execution holds a captured step"),
                                            (4, 8, "every execution holds a captured step")])
def test_without_plain_executions_cost_says_why_instead_of_a_ratio(monkeypatch, every, k, phrase):
    d, log, _ = _dispatcher(monkeypatch, every, k, mixed=every != 1)
    iterator = object()
    for _ in range(12):
        d(iterator)
    assert {kind for kind, _ in log} <= {"probed", "mixed"}
    cost = d.cost()
    assert cost["plain_ms_per_step"] is None and cost["probed_over_plain"] is None
    assert cost["run_over_plain"] is None
    assert phrase in cost["note"]
    assert cost["probed_ms_per_step"] == pytest.approx(_expected_probed(log, k))


def _expected_probed(log, k: int) -> float:
    timed = [duration for _, duration in log][WARMUP_CALLS:]  # one kind only: its first calls left out
    return 1e3 * sum(timed) / (len(timed) * k)
