"""TFDS builder for the copy-memory task: recall 10 symbols after a lag of T blanks.

Hochreiter & Schmidhuber 1997; the form of Arjovsky et al. 2016 ("Unitary evolution RNNs", section 4.1).
Alphabet: 0 blank, 1..8 symbols, 9 delimiter. Input (length T + 20): 10 symbols drawn uniformly from 1..8,
T - 1 blanks, the delimiter, 10 blanks. Target (same length): T + 10 blanks, then the 10 symbols.
Per-token cross-entropy of the memoryless baseline (blanks, then uniform over the 8 symbols for the last 10
steps) is 10 ln(8) / (T + 20), recorded in ``info.metadata`` (``baseline_loss``). One builder config per lag:
``copy_memory/T100`` etc. Generated from a fixed seed per (T, split).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

LAGS = (10, 50, 100, 200, 500)
NUM_SYMBOLS = 8  # data symbols 1..8
RECALL = 10  # symbols to copy
BLANK, DELIMITER, VOCAB = 0, 9, 10
SPLIT_SEEDS = {"train": 0, "test": 1}


def baseline_loss(T: int) -> float:
    """Per-token cross-entropy (nats) of predicting blanks, then uniform symbols: 10 ln(8) / (T + 20)."""
    return RECALL * math.log(NUM_SYMBOLS) / (T + 2 * RECALL)


@dataclasses.dataclass
class CopyConfig(tfds.core.BuilderConfig):
    """A lag ``T`` and split sizes."""

    T: int = 100
    num_train: int = 10_000
    num_test: int = 1_000


def generate(T: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``x`` int32 [n, T + 20] (input tokens) and ``y`` int64 [n, T + 20] (target tokens)."""
    rng = np.random.default_rng([T, seed])
    length = T + 2 * RECALL
    symbols = rng.integers(1, NUM_SYMBOLS + 1, size=(n, RECALL))
    x = np.full((n, length), BLANK, np.int32)
    x[:, :RECALL] = symbols
    x[:, RECALL + T - 1] = DELIMITER
    y = np.full((n, length), BLANK, np.int64)
    y[:, -RECALL:] = symbols
    return x, y


class CopyMemory(tfds.core.GeneratorBasedBuilder):
    """Copy memory with configs ``T10``, ``T50``, ``T100``, ``T200``, ``T500`` (the lag)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [CopyConfig(name=f"T{t}", T=t, description=f"lag {t}") for t in LAGS]

    def _info(self) -> tfds.core.DatasetInfo:
        T = self.builder_config.T
        length = T + 2 * RECALL
        return self.dataset_info_from_configs(
            description="Copy memory: recall 10 symbols (1..8) after T blanks, on the delimiter (9).",
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=(length,), dtype=np.int32),
                "y": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=VOCAB), length=length),
            }),
            supervised_keys=("x", "y"),
            metadata=tfds.core.MetadataDict(
                T=T, task="sequence_classification", vocab_size=VOCAB, baseline_loss=baseline_loss(T),
                baseline_metric="sparse_categorical_crossentropy",
                baseline="blanks, then uniform over the 8 symbols: 10 ln(8) / (T + 20) nats per token"),
            citation="Arjovsky, M., Shah, A. & Bengio, Y. (2016). Unitary evolution recurrent neural networks. ICML.",
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
