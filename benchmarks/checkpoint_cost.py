"""What resuming inside an arm costs: the same arm trained with and without checkpoints, side by side.

    python benchmarks/checkpoint_cost.py [--pairs 5] [--json out.json]

Each case is one arm (digits, SGD with momentum, statistics captured every step) trained in interleaved ABBA
blocks (no checkpoints, checkpoints, checkpoints, none) in this one process, so machine noise hits both
sides alike; the wall-time and CPU-time ratio (checkpoints / none) of every block is recorded and the median
reported, with the checkpoint's size on disk. ``train.checkpoint_epochs: 1`` is the default; the step
interval cases show what a user pays for ``train.checkpoint_steps`` on long epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODELS = {
    "mlp16x64": {"arch": "resnet_mlp", "depth": 16, "width": 64, "branch_scale": "inv_sqrt_depth"},
    "mlp20x256": {"arch": "plain_mlp", "depth": 20, "width": 256, "activation": "relu",
                  "initializer": "he_normal"},
}
# (label, train overrides): the default, and step intervals for long epochs (a digits epoch is 23 steps).
INTERVALS = [("every epoch (default)", {"checkpoint_epochs": 1}),
             ("every 5 steps", {"checkpoint_steps": 5, "checkpoint_epochs": None})]
OFF = {"checkpoint_epochs": None, "checkpoint_steps": None}


def _experiment(model: dict, train: dict):
    from ablations.config import parse_experiment

    return parse_experiment({
        "name": "ckpt", "data": {"name": "digits", "batch_size": 64}, "model": model,
        "train": {"epochs": 6, "optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}, **train},
        "capture": {"every": 1}})


def _one(model: dict, train: dict, root: Path, tag: str) -> tuple[float, float, int]:
    """(wall s, cpu s, largest checkpoint bytes seen) of one arm, trained from scratch in ``root/tag``."""
    from ablations.runner import run_arm

    arm = _experiment(model, train).arms()[0]
    arm_dir = root / tag
    sizes = []

    class Watch:  # the checkpoint is removed when the arm finishes: measure it while it exists
        def __call__(self, drain):
            import keras

            class CB(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    sizes.extend(f.stat().st_size for f in (arm_dir / ".resume").glob("state-*.npz"))
            return CB()

    # Step checkpoints land between epochs' ends too; the epoch-end look sees the latest one of either kind.

    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_arm(arm, arm_dir, callbacks=[Watch()])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if summary["status"] != "completed":
        raise SystemExit(f"{tag}: {summary['status']}: {summary.get('error')}")
    return wall, cpu, max(sizes, default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5, help="ABBA blocks per case")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for mname, model in MODELS.items():
            _one(model, OFF, root, f"warm-{mname}")  # compile caches, data preparation
            for label, train in INTERVALS:
                wall_r, cpu_r, size, n = [], [], 0, 0
                for b in range(args.pairs):
                    times = {}
                    for side in ("off", "on", "on", "off"):
                        n += 1
                        w, c, s = _one(model, OFF if side == "off" else train, root, f"{mname}-{n}")
                        size = max(size, s)
                        times.setdefault(side, []).append((w, c))
                    wall_r.append(sum(w for w, _ in times["on"]) / sum(w for w, _ in times["off"]))
                    cpu_r.append(sum(c for _, c in times["on"]) / sum(c for _, c in times["off"]))
                row = {"model": mname, "checkpoints": label, "wall_ratio": statistics.median(wall_r),
                       "cpu_ratio": statistics.median(cpu_r), "wall_blocks": [round(r, 3) for r in wall_r],
                       "cpu_blocks": [round(r, 3) for r in cpu_r], "checkpoint_bytes": size}
                rows.append(row)
                print(f"{mname:10s} {label:22s} wall {row['wall_ratio']:.3f}x  cpu {row['cpu_ratio']:.3f}x  "
                      f"checkpoint {size / 1e6:.2f} MB  blocks wall {row['wall_blocks']} cpu {row['cpu_blocks']}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
