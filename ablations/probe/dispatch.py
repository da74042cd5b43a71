"""Two compiled train functions and a host-side choice between them: steps that capture nothing run Keras'
plain step on the bare model; an execution that holds a captured step runs the probed one.

The bare model keeps oneDNN's fused MatMul+BiasAdd+activation kernels (the tap model's extra outputs break
the fusion) and carries no ``tf.cond`` around the probed branch, so ``capture.every: 16`` costs almost nothing
on the other 15 steps. The choice needs the step number on the host, without reading the device every call:
the dispatcher counts the steps it hands out (``steps_per_execution`` per call) and reads the optimizer's
step counter only when Keras hands it a new iterator (once per epoch for finite datasets, once per fit
otherwise), which also corrects the count after a short last execution (the data ended mid-way: 7 steps of an
epoch of 23 batches at k 16).

With ``steps_per_execution`` k > 1, an execution that holds a captured step is one call of a third function
(:mod:`ablations.probe.execution`): its plain steps run the plain step, its captured ones the probed step,
without the per-step ``tf.cond`` of the probed function. The dispatcher tells it where the first captured step
falls (``lead``): executions start off the capture grid after an epoch whose length is not a multiple of k
(23 batches at k 16: every execution from the second epoch on), or in a resumed run. Until 2026-12-07 those
ran the probed function: 1.098x plain Keras against 1.039x as one call on the benchmark MLP (every 16, k 16,
epochs of 23 batches; ``benchmarks/off_grid.py``, medians of 10 rounds in one process).

It also measures, from the steps themselves, what capturing costs in this run: the host-observed time of
plain and of probed executions (the first calls of each compiled function, which trace and compile, left
out). On CPU a call
returns when its steps are done; on a GPU the time between calls approaches the steps' time once the queue
is full. Where every execution holds a captured step (``every`` <= k) there are no plain executions to time;
on a CPU (without op determinism, which forbids ``tf.timestamp``) the one-call executions then read the
clock in the graph between their captured and plain steps, which gives both figures without extra steps.
:meth:`Dispatcher.cost` summarises it for the arm's summary.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable

WARMUP_CALLS = 2  # calls of each kind left out of the timing (tracing, compilation, first data)


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` (a strong one where it takes none): the dispatcher keeps no dead iterator."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


class Dispatcher:
    """``train_function(iterator)`` for Keras' fit loop: picks the plain or the probed compiled function.

    Args:
        plain, probed: Keras' compiled multi-step train functions (``steps_per_execution`` steps per call).
        every: the probe's capture interval; ``steps``: steps per execution.
        step_counter: reads the optimizer's step (a host read of the device variable).
        mixed: ``mixed(iterator, lead)``, one call of k steps whose first captured step is step ``lead`` of
            the execution, or None; returns ``(logs, timing)``, ``timing`` as
            :func:`~ablations.probe.execution.captured_execution`'s.
        untimed: why ``mixed`` does not time its steps (None: it does, or there is no ``mixed``).
        uncounted: why the host cannot count the optimizer's steps (None: it can). Then every execution runs
            ``probed``, whose every step decides on the device whether it captures.
    """

    def __init__(self, plain: Callable[[Any], Any], probed: Callable[[Any], Any], every: int, steps: int,
                 step_counter: Callable[[], int], mixed: Callable[..., Any] | None = None,
                 untimed: str | None = None, uncounted: str | None = None):
        self.plain, self.probed, self.every, self.k = plain, probed, int(every), int(steps)
        self.mixed = mixed  # an execution's captured and plain steps in one call
        self.mixed_calls = 0
        self.untimed = untimed
        self.uncounted = uncounted
        self.step_counter = step_counter
        self.next_step: int | None = None
        self.iterator: Callable[[], Any] = lambda: None  # the current iterator, held weakly
        self.calls = {"plain": 0, "probed": 0}
        self.time = {"plain": 0.0, "probed": 0.0}
        self.timed = {"plain": 0, "probed": 0}
        self.timed_steps = {"plain": 0, "probed": 0}  # the steps those timed executions ran
        self.last_timed: str | None = None  # the kind of the last execution, if it was timed
        self.fn_calls = {"plain": 0, "probed": 0, "mixed": 0, "mixed off grid": 0}  # calls of each compiled function
        self.graph_timed = 0  # executions whose in-graph timing is in self.in_graph
        self.graph_host_s = 0.0  # the same executions timed from the host
        # Seconds in captured steps, in plain steps, and their counts, read in the graph (WARMUP_CALLS left out).
        self.in_graph = [0.0, 0.0, 0, 0]

    def due(self, start: int) -> bool:
        """Whether an execution of steps ``[start, start + k)`` holds a captured step."""
        first = -(-start // self.every) * self.every  # the first multiple of `every` at or after start
        return first < start + self.k

    def __call__(self, iterator: Any) -> Any:
        if self.next_step is None or self.iterator() is not iterator:
            # Not by id(): a freed iterator's id can come back with the next fit's (seen in fits of an epoch each).
            self.iterator = _weak(iterator)
            self._resync()
        kind = "probed" if self.every == 1 or self.uncounted or self.due(self.next_step) else "plain"
        lead = -self.next_step % self.every  # plain steps before the execution's first captured step
        fn = kind
        if kind == "probed" and self.mixed is not None:
            fn = "mixed" if lead == 0 else "mixed off grid"  # two traces of one function: each warms up
        self.fn_calls[fn] += 1
        warm = self.fn_calls[fn] > WARMUP_CALLS  # each compiled function traces on its first call: left out
        t0 = time.perf_counter()
        if fn != kind:
            self.mixed_calls += 1
            logs, timing = self.mixed(iterator, lead)
            if timing is not None and warm:
                # A host read of four numbers the call has already computed (on a CPU it has returned).
                self.in_graph = [a + b for a, b in zip(self.in_graph, timing.numpy().tolist())]
        else:
            logs = (self.probed if kind == "probed" else self.plain)(iterator)
        elapsed = time.perf_counter() - t0
        if fn != kind and timing is not None and warm:
            self.graph_timed += 1
            self.graph_host_s += elapsed
        self.calls[kind] += 1
        self.last_timed = kind if warm else None
        if warm:
            self.time[kind] += elapsed
            self.timed[kind] += 1
            self.timed_steps[kind] += self.k  # until _resync finds the execution ran fewer
        self.next_step += self.k
        return logs

    def _resync(self) -> None:
        """Sets the step count from the optimizer's step. A count ahead of it by fewer than k steps is an
        execution the data ended mid-way, the last one: its timed steps are corrected, so that its time is not
        spread over k steps it never ran (which made e.g. every 7-step execution of 23-batch epochs at k 16 look
        16/7 times as fast)."""
        actual = int(self.step_counter())
        short = (self.next_step if self.next_step is not None else actual) - actual
        if self.last_timed is not None and 0 < short < self.k and not self.uncounted:
            self.timed_steps[self.last_timed] -= short
        self.last_timed, self.next_step = None, actual

    def cost(self) -> dict[str, Any]:
        """``capture_cost`` of the arm's summary: ms per step of plain and probed executions, their ratio and
        the estimated slowdown of the whole run against never capturing (None where a kind never ran).

        Where no plain execution ran but the one-call executions timed their own steps (``every`` <= k, on a
        CPU), the figures come from those in-graph times (``"timed": "in-graph"``), with ms per captured step.
        """
        if self.uncounted:
            return {"plain_ms_per_step": None, "probed_ms_per_step": None, "probed_executions": self.calls["probed"],
                    "plain_executions": 0, "probed_over_plain": None, "run_over_plain": None,
                    "note": f"every execution ran the probed function ({self.uncounted}): no plain executions to "
                            f"compare with"}
        if self.next_step is not None:
            self._resync()  # the last execution may have been short (one host read, after training)
        ms = {kind: 1e3 * self.time[kind] / self.timed_steps[kind] if self.timed_steps[kind] else None
              for kind in self.time}
        out: dict[str, Any] = {"plain_ms_per_step": ms["plain"], "probed_ms_per_step": ms["probed"],
                               "probed_executions": self.calls["probed"], "plain_executions": self.calls["plain"],
                               "probed_over_plain": None, "run_over_plain": None}
        graph = self._in_graph()
        if graph:
            out["in_graph"] = graph
        if ms["plain"] and ms["probed"]:
            out["timed"] = "host"
            out["probed_over_plain"] = ms["probed"] / ms["plain"]
            n = self.timed_steps["plain"] + self.timed_steps["probed"]
            out["run_over_plain"] = (self.time["plain"] + self.time["probed"]) * 1e3 / (n * ms["plain"])
        elif graph and "plain_ms_per_step" in graph and not self.timed["plain"]:
            # Every execution captures, so the run is all such executions: its slowdown is theirs.
            out.update(timed="in-graph", plain_ms_per_step=graph["plain_ms_per_step"],
                       probed_ms_per_step=graph["ms_per_step"], probed_over_plain=graph["over_plain"],
                       run_over_plain=graph["over_plain"])
        elif ms["probed"] and self.every == 1:
            out["note"] = "every step is captured: no plain steps to compare with (capture.every > 1 measures it)"
        elif ms["probed"] and self.every <= self.k:
            # Any k consecutive steps hold a multiple of `every`: every execution captures.
            if self.untimed:
                why = f"its steps are not timed in the graph: {self.untimed}"
            else:  # a one-call execution times its steps once warm: only without one
                why = "its steps are not timed in the graph either"
            out["note"] = (f"every execution holds a captured step (capture.every {self.every} <= "
                           f"steps_per_execution {self.k}): no plain executions to compare with, and {why}; "
                           f"capture.every > steps_per_execution measures it")
        return out

    def _in_graph(self) -> dict[str, Any]:
        """The one-call executions' own timing: ms per captured and per plain step, per step of both together."""
        captured_s, plain_s, n_captured, n_plain = self.in_graph
        if not n_captured:
            return {}
        out = {"executions": self.graph_timed, "captured_steps": int(n_captured), "plain_steps": int(n_plain),
               "captured_ms_per_step": 1e3 * captured_s / n_captured,
               "ms_per_step": 1e3 * (captured_s + plain_s) / (n_captured + n_plain)}
        # The same executions timed around their calls: what each call's fixed cost adds.
        out["host_ms_per_step"] = 1e3 * self.graph_host_s / (n_captured + n_plain)
        if n_plain and plain_s > 0:
            plain = 1e3 * plain_s / n_plain
            out.update(plain_ms_per_step=plain, captured_over_plain=out["captured_ms_per_step"] / plain,
                       over_plain=out["ms_per_step"] / plain)
        return out
