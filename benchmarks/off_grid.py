"""Off the capture grid, side by side in one process: plain Keras vs the probe (MLP 20x256, full set, every 16,
steps_per_execution 16) on 5 epochs of N batches (23: every later epoch starts off the grid), off-grid executions
run (new) as one call told their lead or (old) as the probed function with its per-step tf.cond.

    python benchmarks/off_grid.py [N=23] [ROUNDS=10]    (from the repository root)
"""
import statistics, sys, gc, time
sys.path.insert(0, "benchmarks")
import capture_overhead as co
case = next(c for c in co.CASES if c.name == "mlp20x256 full every=16 spe=16")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 23
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
ds = co._dataset(64, case.data).take(n).cache()
plain, probed, cbs = co._models(case)
def fit(m, cb):
    gc.collect(); c0 = time.process_time(); m.fit(ds, epochs=5, verbose=0, callbacks=cb, shuffle=False)
    return 1e3 * (time.process_time() - c0) / (5 * n)
fit(plain, []); fit(probed, cbs())
d = probed.train_function
new = d.mixed
def old(iterator, lead=0):
    return (new(iterator) if lead == 0 else (d.probed(iterator), None))
variants = {"plain": None, "new": new, "old": old}
for v in ("new", "old"):
    d.mixed = variants[v]; fit(probed, cbs())
cpu = {k: [] for k in variants}
for r in range(rounds):
    for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
        if k == "plain":
            cpu[k].append(fit(plain, []))
        else:
            d.mixed = variants[k]; cpu[k].append(fit(probed, cbs()))
base = statistics.median(cpu["plain"])
for k, v in cpu.items():
    m = statistics.median(v)
    print(f"{k:6s} {m:6.2f} ms CPU/step {m / base:5.3f}x ({' '.join(f'{x:.2f}' for x in v)})")
