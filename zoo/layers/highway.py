"""Highway mixing: ``y = H(x) T(x) + x (1 - T(x))`` (Srivastava, Greff & Schmidhuber 2015).

The transform gate ``T`` is an ordinary sigmoid ``Dense``/``Conv2D`` layer (tagged ``gate``) so its output is a
tensor of the graph; this layer only mixes, which keeps ``H``, ``T`` and the carry path separately visible.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="gradzoo")
class HighwayMix(keras.layers.Layer):
    """``[x, h, t] -> h * t + x * (1 - t)``: transform where the gate is open, carry ``x`` where it is shut."""

    def call(self, inputs: Any) -> Any:
        x, h, t = inputs
        return h * t + x * (1.0 - t)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]
