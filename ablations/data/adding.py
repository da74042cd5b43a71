"""TFDS builder for the adding problem: sum the two marked numbers of a length-T sequence.

Hochreiter & Schmidhuber 1997 (experiment 4); the form of Le et al. 2015 / Arjovsky et al. 2016: every step
has two channels, a value drawn from U[0, 1] and a marker; exactly two steps are marked, one uniformly in the
first half [0, T/2) and one in the second half [T/2, T); the target is the sum of the two marked values.
Predicting the mean (1.0) gives MSE Var(u1 + u2) = 2/12 ~ 0.167: the baseline a model must beat, recorded in
``info.metadata`` (``baseline_loss``). One builder config per length: ``adding_problem/T100`` etc.
Generated from a fixed seed per (T, split), so every machine prepares identical data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

LENGTHS = (50, 100, 200, 500, 1000)
BASELINE_MSE = 2.0 / 12.0  # Var(U1 + U2) for independent U[0, 1]: the MSE of always predicting 1
SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass
class AddingConfig(tfds.core.BuilderConfig):
    """A sequence length ``T`` and split sizes."""

    T: int = 100
    num_train: int = 10_000
    num_test: int = 1_000


def generate(T: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``x`` float32 [n, T, 2] (value, marker) and ``y`` float32 [n, 1] (sum of the marked values)."""
    rng = np.random.default_rng([T, seed])
    values = rng.uniform(0.0, 1.0, size=(n, T))
    half = T // 2
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, T, size=n)
    markers = np.zeros((n, T))
    rows = np.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=-1).astype(np.float32), y[:, None].astype(np.float32)


class AddingProblem(tfds.core.GeneratorBasedBuilder):
    """The adding problem with configs ``T50``, ``T100``, ``T200``, ``T500``, ``T1000``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [AddingConfig(name=f"T{t}", T=t, description=f"sequence length {t}") for t in LENGTHS]

    def _info(self) -> tfds.core.DatasetInfo:
        T = self.builder_config.T
        return self.dataset_info_from_configs(
            description="Adding problem: two channels (U[0,1] value, marker); target: sum of the two marked values.",
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=(T, 2), dtype=np.float32),
                "y": tfds.features.Tensor(shape=(1,), dtype=np.float32),
            }),
            supervised_keys=("x", "y"),
            metadata=tfds.core.MetadataDict(
                T=T, task="regression", baseline_loss=BASELINE_MSE, baseline_metric="mse",
                baseline="always predict 1 (the mean target): MSE = Var(u1 + u2) = 1/6"),
            citation="Hochreiter, S. & Schmidhuber, J. (1997). Long short-term memory. Neural Computation.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # generated: nothing to download
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    def _generate_examples(self, split: str, n: int):
        x, y = generate(self.builder_config.T, n, SPLIT_SEEDS[split])
        for i in range(n):
            yield i, {"x": x[i], "y": y[i]}
