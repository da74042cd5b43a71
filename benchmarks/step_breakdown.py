"""Where a captured step's CPU time goes, in one process: the behind-the-figures script of README "Why the MLP
misses its targets".

``--groups``: the benchmark MLP (full set, every step) probed with statistic groups switched off one at a time
(activations, weight/update norms, both), each against plain Keras, in alternating order; run it under
``TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1`` and without, to see what the second thread costs.

``--calls``: the every-16 ``steps_per_execution: 16`` case, where a captured step is a one-step compiled call of
its own and the other 15 steps one call of Keras' own step: both kinds timed apart, beside Keras' own 16-step
and one-step calls.

Usage::

    python benchmarks/step_breakdown.py --groups [--rounds 4]
    python benchmarks/step_breakdown.py --calls [--rounds 6]
"""

from __future__ import annotations

import argparse
import dataclasses
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


def calls(rounds: int, steps: int = 256) -> None:
    """CPU ms per call of each compiled function of the every-16 spe-16 case, and of Keras' own."""
    case = _case("mlp20x256 full every=16 spe=16")
    ds = co._dataset(64)
    plain, probed, cbs = co._models(case)
    plain1, _, _ = co._models(_case("mlp20x256 full every=16 spe=1"))
    for model, cb in ((plain, []), (probed, cbs()), (plain1, [])):
        co._timed_fit(model, ds, 64, cb)
    timed = {"captured one-step call": [0.0, 0], "15 plain steps in one call": [0.0, 0]}
    fn = probed.train_function

    def wrap(f, key):
        def call(iterator):
            c0 = time.process_time()
            out = f(iterator)
            timed[key][0] += time.process_time() - c0
            timed[key][1] += 1
            return out
        return call

    fn.mixed = (wrap(fn.mixed[0], "captured one-step call"), wrap(fn.mixed[1], "15 plain steps in one call"))
    cpu: dict[str, list[float]] = {"Keras, 16 steps per call": [], "probe": [], "Keras, 1 step per call": []}
    for _ in range(rounds):
        for model, key, cb in ((plain, "Keras, 16 steps per call", []), (probed, "probe", cbs()),
                               (probed, "probe", cbs()), (plain, "Keras, 16 steps per call", []),
                               (plain1, "Keras, 1 step per call", [])):
            cpu[key].append(co._timed_fit(model, ds, steps, cb)[1] * 1e3)
    for key, v in cpu.items():
        print(f"{key:28s} {statistics.median(v):6.2f} ms CPU/step")
    for key, (seconds, n) in timed.items():
        print(f"{key:28s} {seconds / n * 1e3:6.2f} ms CPU/call ({n} calls)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", action="store_true", help="statistic groups switched off one at a time")
    p.add_argument("--calls", action="store_true", help="the every-16 spe-16 case's compiled calls timed apart")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if not (args.groups or args.calls):
        p.error("give --groups and/or --calls")
    if args.groups:
        groups(args.rounds)
    if args.calls:
        calls(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
