"""Initializers for recurrent layers: recurrent matrices with a chosen spectrum, LSTM gate biases.

Pascanu, Mikolov & Bengio 2013 (spectral radius of W_rec decides vanishing vs exploding); Le et al. 2015
(IRNN: identity recurrent matrix); Saxe et al. 2014 (orthogonal); Gers et al. 2000 (forget-gate bias 1).

Both classes are registered Keras serializables, so models using them round-trip through ``.keras``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


from zoo.schema import RECURRENT_BASES  # how each square gate block is drawn

_BASE_CLASSES = {
    "orthogonal": keras.initializers.Orthogonal,
    "glorot_uniform": keras.initializers.GlorotUniform,
    "glorot_normal": keras.initializers.GlorotNormal,
    "he_normal": keras.initializers.HeNormal,
    "lecun_normal": keras.initializers.LecunNormal,
}


@keras.saving.register_keras_serializable(package="gradzoo")
class RecurrentInitializer(keras.initializers.Initializer):
    """Recurrent kernel [units, gates * units], drawn one square gate block at a time.

    Each block is ``gain * base`` (``orthogonal``: a random orthogonal matrix, ``identity``: I, or a
    variance-scaling draw); with ``spectral_radius`` set, each block is then rescaled so that the largest
    absolute eigenvalue equals it (the quantity Pascanu et al. 2013 relate to vanishing/exploding
    gradients through time). The gate order is the Keras cell's (LSTM: i, f, c, o; GRU: z, r, h).

    Args:
        base: one of :data:`RECURRENT_BASES`.
        gain: multiplies the base matrix (ignored when ``spectral_radius`` is set).
        spectral_radius: target max |eigenvalue| of every block, or ``None``.
        gates: number of square blocks along the second axis (1 SimpleRNN, 3 GRU, 4 LSTM).
        seed: seed of the base draw (``None``: Keras' global seed, set per arm).
    """

    def __init__(self, base: str = "orthogonal", gain: float = 1.0, spectral_radius: float | None = None,
                 gates: int = 1, seed: int | None = None):
        if base not in RECURRENT_BASES:
            raise ValueError(f"unknown recurrent initializer '{base}'. Known: {', '.join(RECURRENT_BASES)}")
        if spectral_radius is not None and spectral_radius < 0:
            raise ValueError(f"spectral_radius must be >= 0, got {spectral_radius}")
        self.base, self.gain, self.spectral_radius = base, float(gain), spectral_radius
        self.gates, self.seed = int(gates), seed

    def _block(self, n: int, index: int) -> np.ndarray:
        if self.base == "identity":
            return np.eye(n)
        seed = None if self.seed is None else self.seed + index
        init = _BASE_CLASSES[self.base](seed=seed)
        return np.asarray(keras.ops.convert_to_numpy(init((n, n), dtype="float64")))

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        n, m = int(shape[0]), int(shape[1])
        if m != self.gates * n:
            raise ValueError(f"recurrent kernel shape {shape} is not [units, {self.gates} * units]")
        blocks = []
        for g in range(self.gates):
            w = self._block(n, g)
            if self.spectral_radius is not None:
                rho = float(np.max(np.abs(np.linalg.eigvals(w))))
                w = w * (self.spectral_radius / rho if rho > 0 else 0.0)
            else:
                w = w * self.gain
            blocks.append(w)
        return keras.ops.convert_to_tensor(np.concatenate(blocks, axis=1), dtype=dtype or "float32")

    def get_config(self) -> dict[str, Any]:
        return {"base": self.base, "gain": self.gain, "spectral_radius": self.spectral_radius,
                "gates": self.gates, "seed": self.seed}


@keras.saving.register_keras_serializable(package="gradzoo")
class GateBias(keras.initializers.Initializer):
    """A gate-stacked bias: ``value`` on gate ``gate`` (e.g. the LSTM forget gate, index 1), 0 elsewhere.

    Keras' ``unit_forget_bias=True`` is the special case ``value=1`` (Gers et al. 2000; Jozefowicz et al.
    2015); ``value=0`` is the plain zero bias the forget-bias ablation compares against.
    """

    def __init__(self, gates: int = 4, gate: int = 1, value: float = 1.0):
        self.gates, self.gate, self.value = int(gates), int(gate), float(value)

    def __call__(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        (size,) = shape
        units = size // self.gates
        b = np.zeros([size])
        b[self.gate * units:(self.gate + 1) * units] = self.value
        return keras.ops.convert_to_tensor(b, dtype=dtype or "float32")

    def get_config(self) -> dict[str, Any]:
        return {"gates": self.gates, "gate": self.gate, "value": self.value}
