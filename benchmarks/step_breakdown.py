"""Where a captured step's CPU time goes, in one process: the behind-the-figures script of README "Why the MLP
misses its targets".

``--groups``: the benchmark MLP (full set, every step) probed with statistic groups switched off one at a time
(activations, weight/update norms, both), each against plain Keras, in alternating order; run it under
``TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1`` and without, to see what the second thread costs.

``--calls``: the every-16 ``steps_per_execution: 16`` case, where every execution is a captured step and 15
plain ones in one call: that call timed, beside Keras' own 16-step and one-step calls.

``--switch``: the compiled plain and probed one-step functions of the every-16 case called directly, each
timed after a call of the same kind, after the other kind, after a 10 ms sleep and after a 64 MB array is
written (which evicts the caches): what a step costs depends on what ran before it, and a captured step among
plain ones pays that on top of its statistics.

``--merge``: the every-16 ``steps_per_execution: 16`` case with an execution that starts on a captured step run
as one call (:mod:`ablations.probe.execution`, the default; also without its in-graph clock reads), as two
calls (a one-step probed call, then Keras' own 15-step call: the code before 2026-12-05) and as one call of the
probed function, whose every step picks its branch by ``tf.cond``; side by side against plain Keras, in
alternating order.

``--rule ACT``: the benchmark MLP with activation ACT (relu, sigmoid or tanh: those read from their output),
full set every step, with the activation statistics read from the tapped output (the default) and recomputed
from the tapped input (as for every other activation), against plain Keras.

``--loss-scale``: what the loss-scaling fallback costs (under a LossScaleOptimizer the host cannot count the
optimizer's steps, so every step runs the probed function with its per-step ``tf.cond``): the every-16
``steps_per_execution: 16`` case against plain Keras, without and then with a LossScaleOptimizer around the
same SGD, each pair in alternating order. Float32 policy, so that the CPU arithmetic is the ordinary one.

``--against REV``: the one-call execution of this checkout beside that of commit REV (its
``ablations/probe/execution.py``, read with ``git show``, built on this checkout's model), against plain Keras,
in alternating order, on the every-16 ``steps_per_execution: 16`` case (``--case`` another benchmark case):
what ``make bench`` run twice cannot separate from the host's scatter.

Usage::

    python benchmarks/step_breakdown.py --groups [--rounds 4]
    python benchmarks/step_breakdown.py --calls [--rounds 6]
    python benchmarks/step_breakdown.py --switch [--rounds 8]
    python benchmarks/step_breakdown.py --merge [--every 16] [--rounds 6]
    python benchmarks/step_breakdown.py --rule relu [--rounds 6]
    python benchmarks/step_breakdown.py --loss-scale [--rounds 8]
    python benchmarks/step_breakdown.py --against 34adf1e [--case "resnet20 full every=16 spe=16"] [--rounds 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "PYTHONPATH" not in os.environ:  # this checkout's code, as capture_overhead.py does
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import capture_overhead as co  # noqa: E402


def _case(name: str) -> co.Case:
    return next(c for c in co.CASES if c.name == name)


def groups(rounds: int, steps: int = 160) -> None:
    """CPU ms per step of plain Keras and of the probe with each statistic group switched off."""
    base = _case("mlp20x256 full every=1 spe=1")
    variants = {"full set": base, "no activation statistics": dataclasses.replace(base, activations=False),
                "no weight/update norms": dataclasses.replace(base, updates=False),
                "gradient norms only": dataclasses.replace(base, activations=False, updates=False)}
    ds = co._dataset(64)
    models: dict[str, tuple] = {}
    for name, case in variants.items():
        plain, probed, cbs = co._models(case)
        models.setdefault("plain Keras", (plain, lambda: []))
        models[name] = (probed, cbs)
    _alternate(models, ds, rounds, steps)


def calls(rounds: int, steps: int = 256) -> None:
    """CPU ms per call of each compiled function of the every-16 spe-16 case, and of Keras' own."""
    case = _case("mlp20x256 full every=16 spe=16")
    ds = co._dataset(64)
    plain, probed, cbs = co._models(case)
    plain1, _, _ = co._models(_case("mlp20x256 full every=16 spe=1"))
    for model, cb in ((plain, []), (probed, cbs()), (plain1, [])):
        co._timed_fit(model, ds, 64, cb)
    # every == k: every execution holds a captured step, so the probe's plain function never runs here
    timed = {"captured execution (1 probed + 15 plain steps)": [0.0, 0]}
    fn = probed.train_function

    def wrap(f, key):
        def call(iterator, lead=0):
            c0 = time.process_time()
            out = f(iterator, lead)
            timed[key][0] += time.process_time() - c0
            timed[key][1] += 1
            return out
        return call

    fn.mixed = wrap(fn.mixed, "captured execution (1 probed + 15 plain steps)")
    cpu: dict[str, list[float]] = {"Keras, 16 steps per call": [], "probe": [], "Keras, 1 step per call": []}
    for _ in range(rounds):
        for model, key, cb in ((plain, "Keras, 16 steps per call", []), (probed, "probe", cbs()),
                               (probed, "probe", cbs()), (plain, "Keras, 16 steps per call", []),
                               (plain1, "Keras, 1 step per call", [])):
            cpu[key].append(co._timed_fit(model, ds, steps, cb)[1] * 1e3)
    for key, v in cpu.items():
        print(f"{key:48s} {statistics.median(v):6.2f} ms CPU/step")
    for key, (seconds, n) in timed.items():
        print(f"{key:48s} {seconds / n * 1e3:6.2f} ms CPU/call ({n} calls; {seconds / n / 16 * 1e3:.2f} per step)")


def _call_ms(fn, iterator, step) -> float:
    step.assign(0)  # a step the probed function captures (its tf.cond picks the capture branch on multiples of 16)
    c0 = time.process_time()
    fn(iterator)
    return (time.process_time() - c0) * 1e3


def switch(rounds: int) -> None:
    """CPU ms of one plain and one probed compiled step, by what ran just before."""
    import numpy as np

    _, probed, cbs = co._models(_case("mlp20x256 full every=16 spe=1"))
    co._timed_fit(probed, co._dataset(64), 64, cbs())  # trace and compile both functions
    fn, it = probed.train_function, iter(co._dataset(64))
    step = probed.optimizer.iterations

    def captured(iterator):
        step.assign(0)
        return fn.probed(iterator)

    kinds = {"plain": fn.plain, "probed": captured}
    flush = np.zeros(64 << 20, np.uint8)
    before = {"the same kind": lambda own, other: [own(it) for _ in range(4)],
              "the other kind (probed after 15 plain, plain after 1 probed)":
                  lambda own, other: [other(it) for _ in range(15 if own is captured else 1)],
              "a 10 ms sleep": lambda own, other: [own(it), time.sleep(0.01)],
              "64 MB written": lambda own, other: [own(it), flush.fill(1)]}
    ms = {(b, k): [] for b in before for k in kinds}
    for r in range(rounds):
        for b, prepare in (before.items() if r % 2 == 0 else list(before.items())[::-1]):
            for k, own in kinds.items():
                prepare(own, kinds["probed" if k == "plain" else "plain"])
                ms[b, k].append(_call_ms(fn.plain if k == "plain" else fn.probed, it, step))
    for b in before:
        p, q = (statistics.median(ms[b, k]) for k in kinds)
        print(f"after {b:62s} plain {p:6.2f}  probed {q:6.2f} ms CPU  (+{q - p:4.2f})")


def _two_calls(probed, k: int):
    """The captured execution as it was before 2026-12-05: a one-step probed call, then Keras' (k-1)-step one."""
    fn = probed.train_function
    first, rest = probed._compiled(probed.train_step, 1), probed._compiled(probed.plain_train_step, k - 1)
    probed.train_function = fn  # _compiled builds through Keras' make_train_function, which replaces it

    def call(iterator, lead=0):
        assert lead == 0, "the two-call form starts on a captured step; the benchmark's fits stay on the grid"
        first(iterator)
        return rest(iterator), None  # the benchmark's data never ends; no in-graph timing

    return call


def merge(rounds: int, every: int = 16, steps: int = 256) -> None:
    """CPU ms per step of the every-16 spe-16 case (or another ``every``) with the captured execution as one
    call (the default), as two calls (every 16 only), and as the probed function whose every step picks its
    branch by ``tf.cond``."""
    case = dataclasses.replace(_case("mlp20x256 full every=16 spe=16"), every=every)
    ds = co._dataset(64)
    plain, probed, cbs = co._models(case)
    co._timed_fit(plain, ds, 64, [])
    co._timed_fit(probed, ds, 64, cbs())
    fn = probed.train_function
    from ablations.probe.execution import captured_execution

    untimed = captured_execution(probed, case.spe, every, timed=False)  # without the in-graph clock reads
    variants = {"plain Keras": None, "one call (default)": fn.mixed, "one call, untimed": untimed,
                "two calls": _two_calls(probed, case.spe), "per-step tf.cond": None}
    if every % case.spe:
        del variants["two calls"]
    _alternate_executions(plain, probed, cbs, ds, variants, rounds, steps)


def _alternate_executions(plain, probed, cbs, ds, variants: dict, rounds: int, steps: int) -> dict:
    """Plain Keras (key "plain Keras", value None) and the probe with each one-call execution of ``variants``
    (None: the probed function) in its dispatcher, in alternating order; prints and returns CPU ms per step.
    The first variant after plain Keras is the dispatcher's own, restored after."""
    fn = probed.train_function
    for key, mixed in list(variants.items())[1:]:
        fn.mixed = mixed
        co._timed_fit(probed, ds, 64, cbs())  # trace each variant outside the timing
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for key in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            fn.mixed = variants[key]
            model, cb = (plain, []) if key == "plain Keras" else (probed, cbs())
            cpu[key].append(co._timed_fit(model, ds, steps, cb)[1] * 1e3)
    fn.mixed = variants[list(variants)[1]]
    base = statistics.median(cpu["plain Keras"])
    for key, v in cpu.items():
        ms = statistics.median(v)
        print(f"{key:20s} {ms:6.2f} ms CPU/step  {ms / base:5.3f}x  ({' '.join(f'{x:.2f}' for x in v)})")
    return cpu


def rule(rounds: int, act: str, steps: int = 160) -> None:
    """CPU ms per step of the benchmark MLP with activation ``act``, full set every step: plain Keras, the probe
    reading activation statistics from the tapped output, and the probe recomputing them from the input."""
    from unittest import mock

    from ablations.instruments import activation

    base = _case("mlp20x256 full every=1 spe=1")
    case = dataclasses.replace(base, model={**base.model, "activation": act})
    ds = co._dataset(64)
    plain, probed, cbs = co._models(case)
    if activation.output_slope(probed.net.get_layer("block_000_act")) is None:
        raise SystemExit(f"--rule: {act} is not read from its output; nothing to compare")
    with mock.patch.object(activation, "output_slope", lambda layer: None):  # the instrument as before
        _, recomputed, cbs_old = co._models(case)
    models = {"plain Keras": (plain, lambda: []), "from the output": (probed, cbs),
              "recomputed from the input": (recomputed, cbs_old)}
    _alternate(models, ds, rounds, steps)
    loss = float(plain.evaluate(ds, steps=1, verbose=0))
    if not math.isfinite(loss):  # e.g. SELU with this MLP's Glorot init and SGD: NaN within 40 steps
        print(f"warning: plain Keras' loss is {loss}: these are timings of non-finite arithmetic, not a measure")


def loss_scale(rounds: int, steps: int = 256) -> None:
    """CPU ms per step of the every-16 spe-16 case against plain Keras, with plain SGD (the dispatcher) and with
    a LossScaleOptimizer around it (every step through the probed function)."""
    import keras

    case = _case("mlp20x256 full every=16 spe=16")
    ds = co._dataset(64, case.data)
    for label in ("SGD", "LossScaleOptimizer(SGD)"):
        plain, probed, cbs = co._models(case)
        if label != "SGD":
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            for m in (plain, probed):
                opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01, momentum=0.9))
                m.compile(optimizer=opt, loss=loss, steps_per_execution=case.spe)
        print(f"{label}:")
        _alternate({"plain Keras": (plain, lambda: []), "probe": (probed, cbs)}, ds, rounds, steps)
        print(f"  probe: {probed.train_function.uncounted or 'steps counted from the host (the dispatcher)'}")


def against(rounds: int, rev: str, name: str) -> None:
    """CPU ms per step of ``name`` with this checkout's one-call execution and with commit ``rev``'s."""
    import importlib.util
    import subprocess
    import tempfile

    from ablations.probe.model import _why_not_timed_in_graph

    source = subprocess.run(["git", "show", f"{rev}:ablations/probe/execution.py"], check=True, text=True,
                            capture_output=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("execution_at_rev", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    os.unlink(f.name)
    case = _case(name)
    steps = 64 if "resnet" in name else 256
    ds = co._dataset(64, case.data)
    plain, probed, cbs = co._models(case)
    co._timed_fit(plain, ds, 32, [])
    co._timed_fit(probed, ds, 32, cbs())
    fn = probed.train_function
    if fn.mixed is None:
        raise SystemExit(f"--against: {name} runs no one-call execution (spe 1, or every 1)")
    built = old.captured_execution(probed, fn.k, fn.every, timed=_why_not_timed_in_graph() is None)
    variants = {"plain Keras": None, "this checkout": fn.mixed,
                rev: lambda iterator, lead=0: built(iterator, *([lead] if lead else []))}  # older: no lead
    cpu = _alternate_executions(plain, probed, cbs, ds, variants, rounds, steps)
    pairs = list(zip(cpu["this checkout"], cpu[rev]))
    diff = statistics.median(a - b for a, b in pairs)
    print(f"this checkout lower in {sum(a < b for a, b in pairs)} of {rounds} rounds; median difference "
          f"{diff:+.2f} ms per step")


def _alternate(models: dict[str, tuple], ds, rounds: int, steps: int) -> None:
    """Each model fitted ``steps`` steps per round, the order reversed every other round; medians printed."""
    for model, cbs in models.values():
        co._timed_fit(model, ds, 32, cbs())  # trace and compile outside the timing
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            model, cbs = models[name]
            cpu[name].append(co._timed_fit(model, ds, steps, cbs())[1] * 1e3)
    plain_ms = statistics.median(cpu["plain Keras"])
    for name, v in cpu.items():
        ms = statistics.median(v)
        print(f"{name:26s} {ms:6.2f} ms CPU/step  +{ms - plain_ms:5.2f}  {ms / plain_ms:5.3f}x  "
              f"({' '.join(f'{x:.2f}' for x in v)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", action="store_true", help="statistic groups switched off one at a time")
    p.add_argument("--calls", action="store_true", help="the every-16 spe-16 case's compiled calls timed apart")
    p.add_argument("--switch", action="store_true", help="one step's cost by what ran before it")
    p.add_argument("--merge", action="store_true", help="the captured execution as two calls and as one")
    p.add_argument("--every", type=int, default=16, help="--merge: the capture interval (16, or a divisor)")
    p.add_argument("--rule", metavar="ACT",
                   help="activation statistics from the output vs recomputed: relu, sigmoid, tanh")
    p.add_argument("--loss-scale", action="store_true", help="the loss-scaling fallback's cost")
    p.add_argument("--against", metavar="REV", help="this checkout's one-call execution beside commit REV's")
    p.add_argument("--case", default="mlp20x256 full every=16 spe=16", help="--against: the benchmark case")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if not (args.groups or args.calls or args.switch or args.merge or args.rule or args.loss_scale or args.against):
        p.error("give one or more of --groups, --calls, --switch, --merge, --rule ACT, --loss-scale, --against REV")
    if args.groups:
        groups(args.rounds)
    if args.calls:
        calls(args.rounds)
    if args.switch:
        switch(args.rounds)
    if args.merge:
        merge(args.rounds, args.every)
    if args.rule:
        rule(args.rounds, args.rule)
    if args.loss_scale:
        loss_scale(args.rounds)
    if args.against:
        against(args.rounds, args.against, args.case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
