"""One compiled execution of ``steps_per_execution`` k steps whose first step captures and whose other k - 1 run
the plain step: what the dispatcher calls for an execution that starts on a captured step.

As two calls (a one-step probed function, then Keras' k - 1-step function) the execution paid a call's fixed
cost and a host synchronisation in between, and the captured step's statistic reductions could not overlap
the next step's forward pass on another core. In one graph they can: on the benchmark MLP (every 16,
``steps_per_execution: 16``, 2 CPU threads) the case went from 1.062x to 1.016x plain Keras, measured side by
side in one process (``benchmarks/step_breakdown.py --merge``, 6 rounds). A per-step ``tf.cond`` choosing the
branch, the other way to make it one call, measured slower than both (1.123x): lowered, the cond feeds every
tensor its branches read through a Switch node on every step.

With ``every`` a divisor of k, the execution is k / ``every`` groups of one captured step and ``every`` - 1 plain
ones. The loops read the data as Keras' own (``TensorFlowTrainer._make_function``) does, one optional batch
ahead and never past the execution's last step, and stop early when the data ends (an epoch may end right
after a captured step: the logs are then that step's); unlike Keras' they do not wrap each step in a
``tf.cond`` on the batch being there, which the loop's condition has already checked.

Timed (on a CPU), the execution also reads the clock between each group's captured step and its plain ones:
with ``every`` <= k there are no plain executions, and this is how the run still measures what capturing cost.
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


def captured_execution(model: Any, k: int, every: int, timed: bool = False) -> Callable[[Any], Any]:
    """``function(iterator)`` running up to ``k`` steps in one compiled call, from a captured step on: each
    ``every``-th step through ``model.train_step``, the others through ``model.plain_train_step``; returns the
    last step's logs and the execution's own timing.

    Args:
        model: a compiled :class:`~ablations.probe.model.ProbedModel`.
        k: steps per execution (>= 2).
        every: the capture interval (> 1), a multiple or a divisor of ``k``.
        timed: read the clock in the graph around each group's captured step and its plain steps.

    Returns:
        ``(logs, timing)``: ``timing`` is None when not ``timed``, else a float64 vector ``[seconds in captured
        steps, seconds in plain steps, captured steps, plain steps]`` of this execution.
    """
    captured, plain = _one_step(model, model.train_step), _one_step(model, model.plain_train_step)
    size = min(every, k)  # a group: one captured step and size - 1 plain ones
    clock = _clock if timed else (lambda after: tf.constant(0.0, tf.float64))
    ordered = _after if timed else (lambda first, fn: fn())

    def execution(iterator: Any) -> Any:
        def run(step: Callable[[Any], Any], i: Any, logs: Any, nxt: Any) -> tuple[Any, Any, Any]:
            logs = step(nxt.get_value())  # the loops run only while a batch is there
            # No read past the execution's last batch: the next execution starts there.
            return i + 1, logs, tf.cond(tf.less(i + 1, k), iterator.get_next_as_optional, lambda: nxt)

        def in_group(i: Any, logs: Any, nxt: Any) -> Any:
            return tf.logical_and(tf.not_equal(i % size, 0), nxt.has_value())

        def plain_steps(state: Any) -> Any:
            return tf.while_loop(in_group, lambda *v: run(plain, *v), list(state))

        def rest_of_group(i: Any, logs: Any, nxt: Any, spent_captured: Any, spent_plain: Any) -> Any:
            t0 = clock([i, logs])
            state = ordered(t0, lambda: run(captured, i, logs, nxt))
            t1 = clock(state[:2])
            state = ordered(t1, lambda: plain_steps(state))
            return (*state, spent_captured + (t1 - t0), spent_plain + (clock(state[:2]) - t1))

        t0 = clock([])
        logs = ordered(t0, lambda: captured(iterator.get_next()))  # end of data: OutOfRangeError, fit catches it
        t1 = clock(logs)
        state = ordered(t1, lambda: plain_steps([tf.constant(1), logs, iterator.get_next_as_optional()]))
        state = [*state, t1 - t0, clock(state[:2]) - t1]
        if k > size:
            state = tf.while_loop(lambda i, logs, nxt, *_: tf.logical_and(tf.less(i, k), nxt.has_value()),
                                  rest_of_group, state)
        steps, logs = state[0], state[1]
        if not timed:
            return logs, None
        n_captured = (steps + size - 1) // size  # each group starts with its captured step
        counts = tf.cast(tf.stack([n_captured, steps - n_captured]), tf.float64)
        return logs, tf.concat([tf.stack(state[3:5]), counts], 0)

    return execution if model.run_eagerly else tf.function(execution, reduce_retracing=True)


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
