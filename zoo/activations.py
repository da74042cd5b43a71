"""Activation registry: every activation is a separate Keras layer so its input (the pre-activation) exists.

Seed table (LITERATURE.md 15): sigmoid' <= 0.25, tanh' <= 1, ReLU' in {0, 1}, leaky in {alpha, 1}.
`ablate theory` recomputes these numerically from the layers registered here.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import layers

from zoo.registry import Registry

ACTIVATIONS: Registry[Callable[..., keras.layers.Layer]] = Registry("activation")


def _simple(fn_name: str) -> Callable[..., keras.layers.Layer]:
    def make(name: str, dtype: str | None = None, **_: Any) -> keras.layers.Layer:
        return layers.Activation(fn_name, name=name, dtype=dtype)

    return make


for _n in ["sigmoid", "hard_sigmoid", "tanh", "relu", "elu", "selu", "gelu", "linear"]:
    ACTIVATIONS.register(_n, _simple(_n))
ACTIVATIONS.register("swish", _simple("silu"))
ACTIVATIONS.register("silu", _simple("silu"))


@ACTIVATIONS.register("leaky_relu")
def _leaky(name: str, dtype: str | None = None, negative_slope: float = 0.01, **_: Any) -> keras.layers.Layer:
    return layers.LeakyReLU(negative_slope=negative_slope, name=name, dtype=dtype)


@ACTIVATIONS.register("prelu")
def _prelu(name: str, dtype: str | None = None, alpha_init: float = 0.25, **_: Any) -> keras.layers.Layer:
    # He et al. 2015 initialise the PReLU slope to 0.25.
    return layers.PReLU(alpha_initializer=keras.initializers.Constant(alpha_init), name=name, dtype=dtype)


def make_activation(kind: str, name: str, dtype: str | None = None, **options: Any) -> keras.layers.Layer:
    """Builds the activation layer ``kind`` named ``name`` (options: ``negative_slope``, ``alpha_init``)."""
    return ACTIVATIONS.get(kind)(name=name, dtype=dtype, **options)
