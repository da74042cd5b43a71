"""Stochastic depth: drop a residual branch with probability ``1 - p`` while training (Huang et al. 2016).

``mode: batch`` is the paper: one Bernoulli(p) draw per mini-batch keeps or drops the whole branch for every
example. ``mode: sample`` draws per example (DropPath, Larsson et al. 2017). At inference the branch is
always on and scaled by ``p`` (the paper's expectation rule), so outputs are deterministic.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from zoo.schema import DROP_MODES as MODES


@keras.saving.register_keras_serializable(package="gradzoo")
class StochasticDepth(keras.layers.Layer):
    """``[x, f] -> x + b * f`` with ``b ~ Bernoulli(survival_prob)`` in training, ``x + p * f`` at inference.

    The last training call's fraction of active branches is kept in the non-trainable weight ``active``
    (1 or 0 in batch mode, the kept fraction of the batch in sample mode) for probes to read.

    Args:
        survival_prob: probability ``p`` that the branch is kept, in (0, 1].
        mode: ``batch`` (whole mini-batch, the paper) or ``sample`` (per example).
        seed: seed of the layer's random stream (``None``: drawn from Keras' global seed).
    """

    def __init__(self, survival_prob: float = 0.5, mode: str = "batch", seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"stochastic depth mode must be one of {', '.join(MODES)}, got '{mode}'")
        if not 0.0 < float(survival_prob) <= 1.0:
            raise ValueError(f"survival_prob must be in (0, 1], got {survival_prob}")
        self.survival_prob, self.mode, self.seed = float(survival_prob), mode, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape: Any) -> None:
        self.active = self.add_weight(name="active", shape=(), initializer="ones", trainable=False,
                                      aggregation="only_first_replica")

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x, f = inputs
        p = self.survival_prob
        if not training:
            return x + ops.cast(p, f.dtype) * f
        shape = (1,) * len(f.shape) if self.mode == "batch" else (ops.shape(f)[0],) + (1,) * (len(f.shape) - 1)
        keep = ops.cast(keras.random.uniform(shape, seed=self.seed_generator) < p, f.dtype)
        self.active.assign(ops.cast(ops.mean(keep), self.active.dtype))
        return x + keep * f

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "survival_prob": self.survival_prob, "mode": self.mode, "seed": self.seed}
