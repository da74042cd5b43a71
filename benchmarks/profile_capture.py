"""Where the capture overhead goes: per-op host time from the TF profiler, plain fit vs probed fit.

Runs the same model twice under ``tf.profiler`` (plain ``model.fit`` and gradzoo's probe, same data and
steps), reads the XPlane files the profiler writes and prints, per op type, the time and calls per step of
each side, sorted by what the probe adds. This is the profile behind README "Capture overhead".

Usage::

    python benchmarks/profile_capture.py [--case "mlp20x256 full every=1 spe=1"] [--steps 64] [--top 25]

Single-thread figures for each statistic group (no thread-pool effects) come from
``TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 taskset -c 0 python benchmarks/profile_capture.py --groups``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def op_times(model, ds, steps: int, callbacks) -> tuple[collections.Counter, collections.Counter]:
    """(microseconds, calls) per op type over one profiled fit of ``steps`` steps."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    import capture_overhead as co

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        co._timed_fit(model, ds, steps, callbacks)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(logdir).rglob("*.xplane.pb")).read_bytes())
    us, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # executor threads: one event per op run
                continue
            for ev in line.events:
                op = plane.event_metadata[ev.metadata_id].name.split(":")[-1]
                us[op] += ev.duration_ps / 1e6
                calls[op] += 1
    return us, calls


def profile(case_name: str, steps: int, top: int) -> None:
    import capture_overhead as co

    case = next(c for c in co.CASES if c.name == case_name)
    ds = co._dataset(64)
    plain, probed, cbs = co._models(case)
    for model, cb in ((plain, []), (probed, cbs())):
        co._timed_fit(model, ds, steps, cb)  # trace and compile outside the profile
    (pu, pc), (qu, qc) = op_times(plain, ds, steps, []), op_times(probed, ds, steps, cbs())
    print(f"{case.name}: per step, {steps} steps (op events nest: 'Process' contains the ops it ran inline)")
    print(f"{'op':34s} {'plain us':>9s} {'calls':>6s} {'probe us':>9s} {'calls':>6s} {'added us':>9s}")
    for op in sorted(set(pu) | set(qu), key=lambda k: -(qu[k] - pu[k]))[:top]:
        print(f"{op:34s} {pu[op] / steps:9.0f} {pc[op] / steps:6.1f} {qu[op] / steps:9.0f} {qc[op] / steps:6.1f} "
              f"{(qu[op] - pu[op]) / steps:9.0f}")


def groups(reps: int = 7) -> None:
    """CPU time of each instrument alone (its in-graph compute and reductions through its own Reducer, on
    tensors of a real step), against the plain train step of the benchmark MLP."""
    import keras
    import numpy as np
    import tensorflow as tf

    import zoo
    from ablations.instruments.base import Reducer, StepContext
    from ablations.probe import ProbedModel

    net = zoo.build("plain_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=20, width=256)
    for v in net.trainable_variables:  # trained-like biases: all-zero tensors would take the underflow rescue
        if len(v.shape) == 1:
            v.assign(0.01 * np.random.RandomState(0).normal(size=v.shape))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    model = ProbedModel(net, capture={"histograms": True})
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    model.optimizer.build(model.trainable_variables)
    x = tf.random.normal([64, 8, 8, 1])
    y = tf.zeros([64], tf.int32)
    outs = model.tap_model(x, training=True)
    taps, k = {}, 1
    for name, n in model.tap_groups.items():
        taps[name], k = [tf.identity(t) for t in outs[k:k + n]], k + n
    variables = net.trainable_variables
    grads = [tf.random.normal(v.shape) for v in variables]
    old = [tf.identity(v) for v in variables]
    new = [o - 1e-3 * g for o, g in zip(old, grads)]  # a real step's change: all-zero updates take the rescue
    tap_grads = {name: [tf.random.normal(t.shape) for t in ts] for name, ts in taps.items()}

    def alone(inst):
        def run():
            ctx = StepContext(spec=model.spec, model=model, x=x, y=y, sample_weight=None, step=tf.constant(0, tf.int64),
                              loss=tf.constant(1.0), variables=old, grads=grads, taps=taps, tap_grads=tap_grads,
                              scale=None, old_weights=old, off=None)
            red = Reducer()
            fin = inst.compute(ctx, red)
            ctx.variables = new
            inst.after_update(ctx, red)
            r = red.finish()
            out = fin(r) if fin is not None else {}
            return tf.nest.flatten(out if not isinstance(out, dict) else [v for _, v in out.values()])
        return run

    def step():
        with tf.GradientTape() as tape:
            value = loss(y, net(x, training=True))
        opt.apply_gradients(zip(tape.gradient(value, variables), variables))

    fns = {"plain train step": step, **{f"instrument {i.name}": alone(i) for i in model.in_graph}}
    fns = {k: tf.function(f) for k, f in fns.items()}
    for f in fns.values():
        f()
    base = None
    for name, f in fns.items():
        times = []
        for _ in range(reps):
            c0 = time.process_time()
            for _ in range(20):
                f()
            times.append((time.process_time() - c0) / 20 * 1e3)
        ms = float(np.median(times))
        base = base or ms
        print(f"{name:28s} {ms:7.2f} ms CPU  ({100 * ms / base:5.1f}% of the plain step)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="mlp20x256 full every=1 spe=1", help="a case name of capture_overhead.py")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--top", type=int, default=25, help="op types to list")
    p.add_argument("--groups", action="store_true", help="time each statistic group alone instead")
    args = p.parse_args(argv)
    if args.groups:
        groups()
    else:
        profile(args.case, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
