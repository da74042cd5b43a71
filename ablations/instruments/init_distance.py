"""Distance of every weight tensor from its initial value, absolute and relative to the initial norm.

Schneider, Balles & Hennig 2021, "Cockpit: a practical debugging tool for the training of deep neural
networks" (the "distance" instrument); Nagarajan & Kolter 2019, "Generalization in deep networks: the role
of distance from initialization".

Weights are identical on every replica (mirrored), so nothing here is reduced over replicas.
"""

from __future__ import annotations

from typing import Any, Sequence

from ablations.instruments.kernels import norms
from ablations.lazy import tf

DISTANCE_STATS = ("init_distance", "init_distance_ratio")


def initial_copy(variables: Sequence[Any], name: str = "w0") -> list[tf.Variable]:
    """Non-trainable copies of ``variables``' current values (create once, outside the step; under a
    strategy, inside its scope, so the copies are mirrored like the weights)."""
    return [tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"{name}_{i}")
            for i, v in enumerate(variables)]


def init_distances(weights: Sequence[Any], initial: Sequence[Any]) -> tf.Tensor:
    """``[n, 2]`` float32: ``||w_t - w_0||`` and ``||w_t - w_0|| / ||w_0||`` per tensor.

    The difference is taken in the variable's dtype before the float32 norm (casting first would round
    float64 weights and swamp a small distance). Norms go through :func:`ablations.instruments.kernels.norms`, so
    distances far below float32's squared range (a barely moved layer) stay exact instead of reading 0. The
    ratio is NaN for a tensor initialised to zero (biases): use the absolute distance there.
    """
    weights = [tf.convert_to_tensor(w) for w in weights]
    initial = [tf.convert_to_tensor(w0) for w0 in initial]
    out = norms([w - tf.cast(w0, w.dtype) for w, w0 in zip(weights, initial)] + initial)
    n = len(weights)
    dist, w0_norm = out[:n], out[n:]
    ratio = tf.where(w0_norm > 0, dist / tf.where(w0_norm > 0, w0_norm, 1.0), float("nan"))
    return tf.stack([dist, ratio], axis=1)
