"""The README's "Your own model" figures, made by the tool itself (run folder -> ``ablate report`` -> PNG).

1. ``ablate diagnose`` of a saved 8-layer sigmoid Sequential MLP on digits with ``--try-fixes`` (50 steps);
2. keras.applications ResNet50 and MobileNetV2 (``weights=None``, 32x32x3, 10 classes) at init, one batch of
   random images through :meth:`ablations.Probe.measure_at_init`, as two arms of one run folder.

Usage: ``python benchmarks/own_model_figures.py [WORK_DIR]`` (default /tmp/own_model_figures); copies the two
``grad_vs_depth.png`` into docs/figures/ (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def diagnose_figure(work: Path) -> Path:
    import keras

    from ablations.cli import main

    keras.utils.set_random_seed(0)
    L = keras.layers
    model = keras.Sequential([keras.Input((64,))] + [L.Dense(32, activation="sigmoid") for _ in range(8)]
                             + [L.Dense(10)], name="sigmoid8")
    model.save(work / "sigmoid8.keras")
    main(["diagnose", str(work / "sigmoid8.keras"), "--steps", "50", "--try-fixes", "--out", str(work / "runs" / "d"),
          "--report", str(work / "reports" / "d")])
    return work / "reports" / "d" / "grad_vs_depth.png"


def applications_figure(work: Path) -> Path:
    import keras
    import numpy as np

    import ablations
    from ablations.report import build_report

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=16)
    for ctor in (keras.applications.ResNet50, keras.applications.MobileNetV2):
        keras.utils.set_random_seed(0)
        net = ctor(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)
        probe = ablations.Probe(net)
        probe.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        probe.measure_at_init((x, y))
        probe.save_run(work / "runs" / "apps", description="keras.applications at init (weights=None), 16 "
                                                           "random 32x32 images")
    build_report(work / "runs" / "apps", work / "reports" / "apps")
    return work / "reports" / "apps" / "grad_vs_depth.png"


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/own_model_figures")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    figures = ROOT / "docs" / "figures"
    shutil.copy(diagnose_figure(work), figures / "diagnose_sigmoid8_try_fixes.png")
    shutil.copy(applications_figure(work), figures / "keras_applications_at_init.png")


if __name__ == "__main__":
    main()
