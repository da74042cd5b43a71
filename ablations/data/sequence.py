"""The ``sequence`` transform: an image dataset read as a sequence, pixel by pixel or row by row.

Le et al. 2015 (pixel-by-pixel MNIST, and its permuted variant); Arjovsky et al. 2016. ``pixels`` turns an
[H, W, C] image into T = H * W steps of C channels (8x8 digits: T = 64; MNIST: T = 784); ``rows`` into T = H
steps of W * C features. ``permute: <seed>`` applies one fixed random permutation of the time steps (the
same for every example, drawn from NumPy's RandomState(seed)), which spreads local structure over long lags.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

MODES = ("pixels", "rows")


def sequence_shape(shape: tuple[int, ...], mode: str) -> tuple[int, int]:
    """The [T, features] shape an image of ``shape`` ([H, W] or [H, W, C]) becomes."""
    if mode not in MODES:
        raise ValueError(f"sequence mode must be one of {', '.join(MODES)}; got '{mode}'")
    if len(shape) not in (2, 3) or any(d is None for d in shape):
        raise ValueError(f"the sequence transform needs images [H, W] or [H, W, C] of fixed size, got {shape}")
    h, w = shape[0], shape[1]
    c = shape[2] if len(shape) == 3 else 1
    return (h * w, c) if mode == "pixels" else (h, w * c)


def permutation(length: int, seed: int) -> np.ndarray:
    """The fixed time-step permutation of ``permute: seed``."""
    return np.random.RandomState(seed).permutation(length)


def make_transform(shape: tuple[int, ...], mode: str, permute: int | None) -> Callable[[Any], Any]:
    """Returns a per-example TensorFlow function: image -> [T, features] (permuted when ``permute`` is set)."""
    import tensorflow as tf

    target = sequence_shape(shape, mode)
    perm = None if permute is None else tf.constant(permutation(target[0], permute), tf.int32)

    def fn(x: Any) -> Any:
        x = tf.reshape(x, target)  # row-major: pixel (i, j) is step i * W + j; row i is step i
        return x if perm is None else tf.gather(x, perm, axis=0)

    return fn
