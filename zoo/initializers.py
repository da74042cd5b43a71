"""Initializer registry, including Glorot & Bengio's "standard" init and explicit variance scaling.

Glorot & Bengio 2010 ("standard" = U[-1/sqrt(n), 1/sqrt(n)]); He et al. 2015; Saxe et al. 2014 (orthogonal);
Schoenholz et al. 2017 (sigma_w^2 via ``variance_scaling``'s ``scale``).

Keras is imported only inside the factories: each factory's keyword-only arguments (with the ``rules``
given at registration) are the initializer's options, known without TensorFlow (:mod:`zoo.options`). An
initializer takes no option it would ignore: ``gain`` with ``glorot_uniform`` is an error, not two
identical arms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from zoo.registry import Registry
from zoo.rules import Rule

if TYPE_CHECKING:
    import keras

INITIALIZERS: Registry[Callable[..., "keras.initializers.Initializer"]] = Registry("initializer")

# Keras' variance-scaling choices ("normal" is Keras' alias of truncated_normal).
MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "normal", "uniform")
KERAS_NAMED = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal", "lecun_uniform")


def _named(keras_name: str) -> Callable[[], "keras.initializers.Initializer"]:
    def make() -> "keras.initializers.Initializer":
        import keras

        return keras.initializers.get(keras_name)

    return make


for _n in KERAS_NAMED:
    INITIALIZERS.register(_n, _named(_n))


@INITIALIZERS.register("standard")
def _standard() -> "keras.initializers.Initializer":
    import keras

    # U[-a, a] has variance a^2/3; VarianceScaling(uniform) uses a = sqrt(3 s / fan_in), so s = 1/3 gives
    # a = 1/sqrt(fan_in): Glorot & Bengio's "standard" heuristic.
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


@INITIALIZERS.register("orthogonal", rules={"gain": Rule(gt=0)})
def _orthogonal(*, gain: float = 1.0) -> "keras.initializers.Initializer":
    import keras

    return keras.initializers.Orthogonal(gain=gain)


@INITIALIZERS.register("variance_scaling", rules={"scale": Rule(gt=0), "mode": Rule(choices=MODES),
                                                  "distribution": Rule(choices=DISTRIBUTIONS)})
def _variance_scaling(*, scale: float = 1.0, mode: str = "fan_in",
                      distribution: str = "truncated_normal") -> "keras.initializers.Initializer":
    import keras

    return keras.initializers.VarianceScaling(scale=scale, mode=mode, distribution=distribution)


@INITIALIZERS.register("lsuv", rules={"gain": Rule(gt=0), "tol": Rule(gt=0), "max_iter": Rule(ge=1)})
def _lsuv(*, gain: float = 1.0, tol: float = 0.1, max_iter: int = 10) -> "keras.initializers.Initializer":
    import keras

    # Mishkin & Matas 2016 start from orthonormal kernels; the data-driven rescaling (`tol`, `max_iter`) needs a
    # batch, so the runner applies it after the build (zoo.lsuv.apply takes the same options).
    del tol, max_iter
    return keras.initializers.Orthogonal(gain=gain)


def make_initializer(kind: str, **options: Any) -> "keras.initializers.Initializer":
    """Builds the kernel initializer ``kind`` (options: ``gain``, ``scale``, ``mode``, ``distribution``, ...).

    Raises:
        UnknownNameError: ``kind`` is not registered.
        TypeError: an option that ``kind`` does not take (``zoo.check_options`` says so before any build).
    """
    return INITIALIZERS.get(kind)(**options)


def make_bias_initializer(std: float = 0.0) -> "keras.initializers.Initializer":
    """Zeros, or N(0, std^2) biases (sigma_b of Schoenholz et al. 2017)."""
    import keras

    return keras.initializers.Zeros() if std == 0 else keras.initializers.RandomNormal(stddev=std)
