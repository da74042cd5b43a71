"""What depth costs: first ``fit`` call (trace + graph optimisation + one step) and steady step time of a deep
narrow ReZero MLP, plain Keras ``fit`` against gradzoo's probe (full statistic set every step).

Bachlechner et al. 2020 train ReZero nets of thousands of layers; with the probe every block's statistics are
ops built once when the step is traced, so depth shows up in the first call, not as Python work per step.
Plain and probed runs alternate (``--reps`` of each); times are wall seconds of this process.

Usage::

    python benchmarks/deep_trace.py [--depth 250] [--width 16] [--steps 40] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(kind: str, depth: int, width: int, steps: int) -> tuple[float, float]:
    """(first fit seconds, ms per later step) of one fresh model."""
    import keras
    import numpy as np
    import tensorflow as tf

    import zoo
    from ablations.probe import DrainCallback, ProbedModel

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(64, 8, 8, 1)).astype("float32"), np.arange(64) % 10
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    keras.utils.set_random_seed(0)
    net = zoo.build("rezero_mlp", input_shape=(8, 8, 1), num_outputs=10, depth=depth, width=width)
    model = net if kind == "plain" else ProbedModel(net, capacity=8)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [] if kind == "plain" else [DrainCallback(drain_every=256, steps_per_epoch=4)]
    t0 = time.perf_counter()
    model.fit(ds.take(1), verbose=0, callbacks=callbacks)
    t1 = time.perf_counter()
    model.fit(ds.repeat(), steps_per_epoch=steps, verbose=0, callbacks=callbacks)
    return t1 - t0, (time.perf_counter() - t1) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=250)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed steps after the first call")
    p.add_argument("--reps", type=int, default=2, help="runs of each kind, alternating")
    args = p.parse_args(argv)
    for _ in range(args.reps):
        for kind in ("plain", "probe"):
            first, ms = run(kind, args.depth, args.width, args.steps)
            print(f"{kind:5s} depth {args.depth} width {args.width}: first fit {first:6.1f} s, "
                  f"then {ms:6.1f} ms per step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
