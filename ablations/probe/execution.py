"""One compiled execution of ``steps_per_execution`` k steps holding a captured step: its captured steps run
the probed step, the others Keras' plain step, in one call. The dispatcher calls it for every execution that
holds a captured step, wherever in the execution that falls.

As two calls (a one-step probed function, then Keras' k - 1-step function) the execution paid a call's fixed
cost and a host synchronisation in between, and the captured step's statistic reductions could not overlap
the next step's forward pass on another core. In one graph they can: on the benchmark MLP (every 16,
``steps_per_execution: 16``, 2 CPU threads) the case went from 1.062x to 1.016x plain Keras, measured side by
side in one process (``benchmarks/step_breakdown.py --merge``, 6 rounds). A per-step ``tf.cond`` choosing the
branch, the other way to make it one call, measured slower than both (1.123x): lowered, the cond feeds every
tensor its branches read through a Switch node on every step.

The execution is ``lead`` plain steps (0 on the capture grid; an epoch whose length is not a multiple of k, or
a resumed run, starts off it), then groups of one captured step and up to ``every`` - 1 plain ones, never
more than k steps. The loops read the data as Keras' own (``TensorFlowTrainer._make_function``) does, one
optional batch ahead and never past the execution's last step, and stop early when the data ends (an epoch may
end right after a captured step: the logs are then that step's); unlike Keras' they do not wrap each step in a
``tf.cond`` on the batch being there, which the loop's condition has already checked.

Timed (on a CPU), the execution also reads the clock between each captured step and its plain steps: with
``every`` <= k there are no plain executions, and this is how the run still measures what capturing cost.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from ablations import compat


def _one_step(model: Any, step_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``step_fn`` on one batch under the model's strategy, its logs reduced over replicas, as Keras runs it."""
    strategy = model.distribute_strategy

    def run(data: Any) -> Any:
        return compat.reduce_step_logs(strategy.run(step_fn, args=(data,)), strategy)

    if not model.run_eagerly:
        run = tf.function(run, reduce_retracing=True, jit_compile=model.jit_compile)

    def step(data: Any) -> Any:
        # A dataset's optional elements (e.g. a missing sample weight) reach the step as None, as in Keras.
        return run(tf.nest.map_structure(lambda t: None if isinstance(t, tf.experimental.Optional) else t, data))

    return step


def captured_execution(model: Any, k: int, every: int, timed: bool = False) -> Callable[..., Any]:
    """``function(iterator, lead=0)`` running up to ``k`` steps in one compiled call: the captured steps
    (every ``every``-th) through ``model.captured_train_step``, the others through ``model.plain_train_step``;
    returns the last step's logs and the execution's own timing.

    Args:
        model: a compiled :class:`~ablations.probe.model.ProbedModel`.
        k: steps per execution (>= 2).
        every: the capture interval (>= 2).
        timed: read the clock in the graph around each captured step and its plain steps.

    Returns:
        ``function(iterator, lead=0)``: ``lead`` is the number of plain steps before the execution's first
        captured step (0 <= lead < k; a resumed run or an epoch whose length is not a multiple of k starts off
        the capture grid). It returns ``(logs, timing)``: ``timing`` is None when not ``timed``, else a float64
        vector ``[seconds in captured steps, seconds in plain steps, captured steps, plain steps]``.
    """
    captured, plain = _one_step(model, model.captured_train_step), _one_step(model, model.plain_train_step)
    clock = _clock if timed else (lambda after: tf.constant(0.0, tf.float64))
    ordered = _after if timed else (lambda first, fn: fn())

    def execution(iterator: Any, lead: Any = None) -> Any:
        offset = 0 if lead is None else lead  # the first captured step's index in the execution

        def run(step: Callable[[Any], Any], i: Any, logs: Any, nxt: Any) -> tuple[Any, Any, Any]:
            logs = step(nxt.get_value())  # the loops run only while a batch is there
            # No read past the execution's last batch: the next execution starts there.
            return i + 1, logs, tf.cond(tf.less(i + 1, k), iterator.get_next_as_optional, lambda: nxt)

        def until_captured(i: Any, logs: Any, nxt: Any) -> Any:
            due = tf.equal((i - offset) % every, 0)
            return tf.logical_and(tf.logical_and(tf.less(i, k), tf.logical_not(due)), nxt.has_value())

        def plain_steps(state: Any) -> Any:
            return tf.while_loop(until_captured, lambda *v: run(plain, *v), list(state))

        def group(i: Any, logs: Any, nxt: Any, spent_captured: Any, spent_plain: Any) -> Any:
            t0 = clock([i, logs])
            state = ordered(t0, lambda: run(captured, i, logs, nxt))
            t1 = clock(state[:2])
            state = ordered(t1, lambda: plain_steps(state))
            return (*state, spent_captured + (t1 - t0), spent_plain + (clock(state[:2]) - t1))

        t0 = clock([])
        first = captured if lead is None else plain
        logs = ordered(t0, lambda: first(iterator.get_next()))  # end of data: OutOfRangeError, fit catches it
        t1 = clock(logs)
        state = ordered(t1, lambda: plain_steps([tf.constant(1), logs, iterator.get_next_as_optional()]))
        head, tail = t1 - t0, clock(state[:2]) - t1
        state = [*state, head, tail] if lead is None else [*state, tf.zeros_like(head), head + tail]
        if lead is not None or k > every:
            state = tf.while_loop(lambda i, logs, nxt, *_: tf.logical_and(tf.less(i, k), nxt.has_value()),
                                  group, state)
        steps, logs = state[0], state[1]
        if not timed:
            return logs, None
        n_captured = tf.maximum(steps - offset + every - 1, 0) // every  # steps offset, offset + every, ...
        return logs, tf.concat([tf.stack(state[3:5]), tf.cast([n_captured, steps - n_captured], tf.float64)], 0)

    return _by_lead(execution if model.run_eagerly else tf.function(execution, reduce_retracing=True))


def _by_lead(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled(iterator)`` for an execution on the capture grid, else with its lead as a tensor: two traces
    in all, one for every offset."""
    def call(iterator: Any, lead: int = 0) -> Any:
        return compiled(iterator) if lead == 0 else compiled(iterator, tf.constant(lead, tf.int32))

    return call


# Explicit control dependencies place each clock read: automatic ones do not order tf.timestamp among the steps
# (measured: 3 us "captured steps" on the MLP). A step's outputs wait for its variable updates (a tf.function's
# returned tensors depend on its side effects), so a read after them is after the step. Host wall time on a
# CPU; on an accelerator it would read when kernels were queued, hence only on a CPU.
def _clock(after: Any) -> Any:
    """``tf.timestamp()`` once the tensors ``after`` are computed."""
    with tf.control_dependencies(tf.nest.flatten(after)):
        return tf.timestamp()


def _after(first: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` with its ops (a step's call, a loop) run after the op of ``first``."""
    with tf.control_dependencies([first]):
        return fn()
