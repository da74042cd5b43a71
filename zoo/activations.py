"""Activation registry: every activation is a separate Keras layer so its input (the pre-activation) exists.

Seed table (LITERATURE.md 15): sigmoid' <= 0.25, tanh' <= 1, ReLU' in {0, 1}, leaky in {alpha, 1}.
`ablate theory` recomputes these numerically from the layers registered here.

This module imports Keras only inside the factories, so the names and the options of every activation
(each factory's keyword-only arguments, with the ``rules`` given at registration) are known without
TensorFlow: ``ablate validate`` checks ``activation_options`` against them (:mod:`zoo.options`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from zoo.registry import Registry
from zoo.rules import Rule

if TYPE_CHECKING:
    import keras

ACTIVATIONS: Registry[Callable[..., "keras.layers.Layer"]] = Registry("activation")

# Activations without options: the registered name -> Keras' function name.
SIMPLE = {"sigmoid": "sigmoid", "hard_sigmoid": "hard_sigmoid", "tanh": "tanh", "relu": "relu", "elu": "elu",
          "selu": "selu", "gelu": "gelu", "linear": "linear", "swish": "silu", "silu": "silu"}


def _simple(fn_name: str) -> Callable[..., "keras.layers.Layer"]:
    def make(name: str, dtype: str | None = None) -> "keras.layers.Layer":
        from keras import layers

        return layers.Activation(fn_name, name=name, dtype=dtype)

    return make


for _n, _fn in SIMPLE.items():
    ACTIVATIONS.register(_n, _simple(_fn))


@ACTIVATIONS.register("leaky_relu", rules={"negative_slope": Rule(ge=0)})
def _leaky(name: str, dtype: str | None = None, *, negative_slope: float = 0.01) -> "keras.layers.Layer":
    from keras import layers

    return layers.LeakyReLU(negative_slope=negative_slope, name=name, dtype=dtype)


@ACTIVATIONS.register("prelu", rules={"alpha_init": Rule()})
def _prelu(name: str, dtype: str | None = None, *, alpha_init: float = 0.25) -> "keras.layers.Layer":
    import keras

    # He et al. 2015 initialise the PReLU slope to 0.25.
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(alpha_init), name=name, dtype=dtype)


def make_activation(kind: str, name: str, dtype: str | None = None, **options: Any) -> "keras.layers.Layer":
    """Builds the activation layer ``kind`` named ``name`` (options: ``negative_slope``, ``alpha_init``).

    Raises:
        UnknownNameError: ``kind`` is not registered.
        TypeError: an option that ``kind`` does not take (``zoo.check_options`` says so before any build).
    """
    return ACTIVATIONS.get(kind)(name=name, dtype=dtype, **options)
