"""Position information for transformer inputs: fixed sinusoidal encodings or a learned table.

Vaswani et al. 2017, "Attention is all you need" (section 3.5: sinusoids; learned embeddings "nearly identical").
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def sinusoidal_table(length: int, d_model: int) -> np.ndarray:
    """PE[t, 2k] = sin(t / 10000^(2k/d)), PE[t, 2k+1] = cos(t / 10000^(2k/d)); shape [length, d_model]."""
    t = np.arange(length)[:, None]
    k = np.arange(d_model)[None, :]
    angle = t / np.power(10000.0, (2 * (k // 2)) / d_model)
    return np.where(k % 2 == 0, np.sin(angle), np.cos(angle))


@keras.saving.register_keras_serializable(package="gradzoo")
class SinusoidalPositions(keras.layers.Layer):
    """Adds the fixed sinusoidal encoding to a [B, T, d_model] sequence (no weights)."""

    def call(self, x: Any) -> Any:
        length, d_model = int(x.shape[1]), int(x.shape[2])
        table = keras.ops.convert_to_tensor(sinusoidal_table(length, d_model), dtype=self.compute_dtype)
        return x + table[None]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


@keras.saving.register_keras_serializable(package="gradzoo")
class LearnedPositions(keras.layers.Layer):
    """Adds a trainable [T, d_model] table (``positions``, N(0, stddev^2) at init) to a sequence.

    Args:
        stddev: standard deviation of the initial table (0.02, as in BERT/GPT-2).
    """

    def __init__(self, stddev: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self.stddev = float(stddev)

    def build(self, input_shape: tuple) -> None:
        self.positions = self.add_weight(
            shape=(int(input_shape[1]), int(input_shape[2])), name="positions",
            initializer=keras.initializers.RandomNormal(stddev=self.stddev))

    def call(self, x: Any) -> Any:
        return x + keras.ops.cast(self.positions, x.dtype)[None]

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "stddev": self.stddev}
