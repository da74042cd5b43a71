"""ReZero residual: ``x + alpha * F(x)`` with one trainable scalar ``alpha`` (Bachlechner et al. 2020).

With ``alpha = 0`` at initialisation every block is exactly the identity, so the input-output Jacobian of
the whole network is the identity at init, at any depth, without normalisation.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="gradzoo")
class ReZero(keras.layers.Layer):
    """Adds a residual branch scaled by a trainable scalar: ``[x, f] -> x + alpha * f``.

    Args:
        alpha_init: initial value of ``alpha`` (the paper: 0, the block starts as the identity).
    """

    def __init__(self, alpha_init: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.alpha_init = float(alpha_init)

    def build(self, input_shape: Any) -> None:
        # One scalar per block, named `alpha` so the probe's params table shows it as param == "alpha".
        self.alpha = self.add_weight(name="alpha", shape=(), initializer=keras.initializers.Constant(self.alpha_init),
                                     trainable=True)

    def call(self, inputs: Any) -> Any:
        x, f = inputs
        return x + keras.ops.cast(self.alpha, f.dtype) * f

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha_init": self.alpha_init}
