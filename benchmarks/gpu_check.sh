#!/usr/bin/env bash
# GPU check (under 8 minutes on one GPU): the quickstart and a ResNet-20 arm on the GPU with
# runtime.strategy auto and mixed precision, and the training speed (steps/s) with and without capture.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make venv`
#   PYTHON=python ABLATE=ablate bash benchmarks/gpu_check.sh   # another environment
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_STEPS=20 QUICKSTART_ARGS="--set model.depth=4 --set train.epochs=1" \
#       bash benchmarks/gpu_check.sh      # dry run of the script itself on a CPU-only machine
#
# Prints: the GPUs TensorFlow sees and the strategy `auto` picks; the quickstart's wall time and arm statuses;
# a table of steps/s for a quickstart MLP and ResNet-20 (resnet_cnn depth 9 = 6n+2 = 20 layers, He et al.
# 2016) with capture off (capture.every huge: only step 0 captured) and on (every step). Steps/s are timed over
# the epochs after the first (which includes tracing). Exits non-zero when no GPU is visible or an arm fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ABLATE=${ABLATE:-.venv/bin/ablate}
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
echo "gpu_check: outputs in $OUT"

timeout 60 "$PY" - <<'EOF'
import os
import sys
import tensorflow as tf
from ablations.config import RuntimeConfig
from ablations.strategy import make_strategy

gpus = tf.config.list_physical_devices("GPU")
print(f"TensorFlow {tf.__version__}; GPUs: {[g.name for g in gpus] or 'none'}")
if not gpus and os.environ.get("GPU_CHECK_ALLOW_CPU") != "1":
    sys.exit("gpu_check: no GPU visible to TensorFlow (install the `tensorflow[and-cuda]` wheel?)")
s = make_strategy(RuntimeConfig(strategy="auto"))
print(f"runtime.strategy auto -> {type(s).__name__} with {s.num_replicas_in_sync} replica(s)")
EOF

start=$(date +%s)
set +e
timeout 240 "$ABLATE" run configs/quickstart.yaml --out "$OUT/runs" --no-report \
    --set runtime.strategy=auto --set runtime.precision=mixed_float16 ${QUICKSTART_ARGS:-} > "$OUT/quickstart.log" 2>&1
qs=$?
tail -n 40 "$OUT/quickstart.log"
echo "quickstart (strategy auto, mixed_float16): exit $qs in $(( $(date +%s) - start )) s"

timeout 150 "$PY" - "$OUT" <<'EOF'
import os
import sys
import time
from pathlib import Path

import keras

from ablations.config import parse_experiment
from ablations.runner import run_arm

OUT, EPOCHS = Path(sys.argv[1]), 4
STEPS = int(os.environ.get("GPU_CHECK_STEPS", 200))


class Rate(keras.callbacks.Callback):
    """Training time per epoch (up to validation), without per-batch hooks that would sync the device."""

    async_safe = True

    def __init__(self) -> None:
        super().__init__()
        self.t0, self.seconds = None, []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_test_begin(self, logs=None):
        self._stop()

    def on_epoch_end(self, epoch, logs=None):
        self._stop()

    def _stop(self):
        if self.t0 is not None:
            self.seconds.append(time.perf_counter() - self.t0)
            self.t0 = None


CASES = {
    "quickstart MLP (plain_mlp relu, depth 16, width 64, batch 64)":
        ({"arch": "plain_mlp", "depth": 16, "width": 64, "activation": "relu"}, 64),
    "ResNet-20 (resnet_cnn depth 9, batch 128)": ({"arch": "resnet_cnn", "depth": 9}, 128),
}
failed = 0
print(f"{'model':62} {'capture':22} {'steps/s':>9}  status")
for name, (model, batch) in CASES.items():
    rates = {}
    for label, every in (("off (step 0 only)", 10**9), ("every step", 1)):
        exp = parse_experiment({
            "name": "gpu_check", "model": model, "data": {"batch_size": batch, "val_split": None},
            "train": {"epochs": EPOCHS, "steps_per_epoch": STEPS, "steps_per_execution": 4,
                      "optimizer": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}},
            "capture": {"every": every},
            "runtime": {"strategy": "auto", "precision": "mixed_float16", "deterministic": False}})
        rate = Rate()
        summary = run_arm(exp.arms()[0], OUT / "speed" / f"{model['arch']}_{every}", callbacks=[rate])
        failed += summary["status"] != "completed"
        rates[label] = STEPS * (len(rate.seconds) - 1) / sum(rate.seconds[1:]) if len(rate.seconds) > 1 else float("nan")
        print(f"{name:62} {label:22} {rates[label]:9.1f}  {summary['status']} {summary.get('error') or ''}")
    print(f"{'':62} {'capture cost':22} {rates['off (step 0 only)'] / rates['every step']:8.2f}x")
sys.exit(1 if failed else 0)
EOF
speed=$?
set -e
echo "gpu_check: done in $(( $(date +%s) - start )) s (quickstart exit $qs, speed exit $speed)"
exit $(( qs != 0 || speed != 0 ))
