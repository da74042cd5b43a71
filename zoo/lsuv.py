"""Layer-sequential unit-variance (LSUV) initialisation (Mishkin & Matas 2016, "All you need is a good init").

Start from orthonormal kernels (the ``lsuv`` initializer), then, layer by layer from the input, rescale
each linear layer's kernel by ``1 / sqrt(Var(output))`` on a batch of training data until the variance of
its output is within ``tol`` of 1, at most ``max_iter`` times per layer. A layer whose output variance is zero
or not finite, or that does not converge, raises :class:`LSUVError` naming it. Layers with a built-in
non-linearity (the highway transform gates) are left as initialised: their output is not a pre-activation.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf


class LSUVError(RuntimeError):
    """LSUV could not bring a layer's output variance to 1 within the tolerance."""


def lsuv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's linear layers (Dense / Conv2D without a fused activation), in graph order."""
    out = []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            if getattr(layer.activation, "__name__", "linear") == "linear":
                out.append(layer)
    return out


def apply(model: keras.Model, x: Any, *, tol: float = 0.1, max_iter: int = 10, gain: float | None = None
          ) -> dict[str, float]:
    """Rescales every linear layer of ``model`` in place so its output variance on ``x`` is 1 +- ``tol``.

    Args:
        model: a built functional model (its kernels already orthonormal, e.g. ``initializer: lsuv``).
        x: a batch of training inputs.
        tol: accepted |Var - 1| (the paper: 0.1).
        max_iter: rescalings allowed per layer before giving up.
        gain: the orthonormal start's gain, consumed by the initializer; accepted here so the same
            ``initializer_options`` serve both.

    Returns:
        ``{layer name: final output variance}``.

    Raises:
        LSUVError: a layer's output variance is 0 or not finite, or still outside the tolerance after
            ``max_iter`` rescalings.
    """
    del gain
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"LSUV needs tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    targets = lsuv_layers(model)
    if not targets:
        return {}
    x = tf.convert_to_tensor(x, dtype=model.inputs[0].dtype)
    taps = keras.Model(model.inputs, [layer.output for layer in targets])
    forward = tf.function(lambda: taps(x, training=False))  # kernels are read afresh on every call
    outputs = lambda: tf.nest.flatten(forward())  # noqa: E731  (a one-output model returns a tensor)
    result: dict[str, float] = {}
    for i, layer in enumerate(targets):
        var = _variance(outputs()[i])
        iterations = 0
        while True:
            if not math.isfinite(var) or var <= 0.0:
                raise LSUVError(
                    f"LSUV cannot rescale layer '{layer.name}': its output variance on the batch is {var:.4g} "
                    f"(dead or constant input: check the data batch and the layers before it)")
            if abs(var - 1.0) < tol:
                break
            if iterations == max_iter:
                raise LSUVError(
                    f"LSUV did not converge on layer '{layer.name}': output variance {var:.4g} after {max_iter} "
                    f"rescalings (tolerance {tol}); raise initializer_options.max_iter or tol, or lower "
                    f"bias_init_std (biases are not rescaled)")
            layer.kernel.assign(layer.kernel / tf.cast(math.sqrt(var), layer.kernel.dtype))
            iterations += 1
            var = _variance(outputs()[i])
        result[layer.name] = var
    return result


def _variance(t: Any) -> float:
    return float(np.var(np.asarray(t, dtype=np.float64)))
