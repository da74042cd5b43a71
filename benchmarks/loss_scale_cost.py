"""What the loss-scaling fallback costs on a CPU: under a LossScaleOptimizer every step runs the probed
function with its per-step tf.cond (the host cannot count the optimizer's steps). Float32 policy, so that the
CPU arithmetic is the ordinary one: plain Keras + LSO against probe + LSO, and plain Keras against the probe
without LSO (the dispatcher), MLP 20x256, full set, every 16, k 16; alternating order, medians.

    python benchmarks/loss_scale_cost.py [ROUNDS=8]    (from the repository root)
"""
import statistics, sys
sys.path.insert(0, "benchmarks")
import keras
import capture_overhead as co
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
case = next(c for c in co.CASES if c.name == "mlp20x256 full every=16 spe=16")
ds = co._dataset(64, case.data)
plain, probed, cbs = co._models(case)
lplain, lprobed, lcbs = co._models(case)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
for m in (lplain, lprobed):
    m.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01, momentum=0.9)), loss=loss,
              steps_per_execution=16)
models = {"plain": (plain, lambda: []), "probe": (probed, cbs), "plain+LSO": (lplain, lambda: []),
          "probe+LSO": (lprobed, lcbs)}
for m, cb in models.values():
    co._timed_fit(m, ds, 64, cb())
print("LSO probe uncounted:", lprobed.train_function.uncounted)
cpu = {k: [] for k in models}
for r in range(rounds):
    for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
        m, cb = models[k]
        cpu[k].append(co._timed_fit(m, ds, 256, cb())[1] * 1e3)
med = {k: statistics.median(v) for k, v in cpu.items()}
for k, v in cpu.items():
    base = med["plain+LSO"] if "LSO" in k else med["plain"]
    print(f"{k:10s} {med[k]:6.2f} ms CPU/step {med[k] / base:5.3f}x ({' '.join(f'{x:.2f}' for x in v)})")
