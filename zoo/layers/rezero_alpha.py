"""ReZero's residual weight: a trainable scalar multiplying a residual branch, 0 at init.

Bachlechner et al. 2020, "ReZero is all you need": x_{i+1} = x_i + alpha_i F(x_i), alpha_i = 0 at init, so
every block is the identity and the input-output Jacobian is exactly I.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="gradzoo")
class ReZeroAlpha(keras.layers.Layer):
    """Returns ``alpha * branch`` with one trainable scalar ``alpha`` (initialised to ``alpha_init``).

    Args:
        alpha_init: initial value of alpha (0 in the paper).
    """

    def __init__(self, alpha_init: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.alpha_init = float(alpha_init)

    def build(self, input_shape: tuple) -> None:
        self.alpha = self.add_weight(shape=(), name="alpha",
                                     initializer=keras.initializers.Constant(self.alpha_init))

    def call(self, branch: Any) -> Any:
        return keras.ops.cast(self.alpha, branch.dtype) * branch

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha_init": self.alpha_init}
