"""Initializer registry, including Glorot & Bengio's "standard" init and explicit variance scaling.

Glorot & Bengio 2010 ("standard" = U[-1/sqrt(n), 1/sqrt(n)]); He et al. 2015; Saxe et al. 2014 (orthogonal);
Schoenholz et al. 2017 (sigma_w^2 via ``variance_scaling``'s ``scale``).
"""

from __future__ import annotations

from typing import Any, Callable

import keras

from zoo.registry import Registry

INITIALIZERS: Registry[Callable[..., keras.initializers.Initializer]] = Registry("initializer")

for _n in ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_normal", "lecun_uniform"]:
    INITIALIZERS.register(_n, (lambda n: lambda **_: keras.initializers.get(n))(_n))


@INITIALIZERS.register("standard")
def _standard(**_: Any) -> keras.initializers.Initializer:
    # U[-a, a] has variance a^2/3; VarianceScaling(uniform) uses a = sqrt(3 s / fan_in), so s = 1/3 gives
    # a = 1/sqrt(fan_in): Glorot & Bengio's "standard" heuristic.
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


@INITIALIZERS.register("orthogonal")
def _orthogonal(gain: float = 1.0, **_: Any) -> keras.initializers.Initializer:
    return keras.initializers.Orthogonal(gain=gain)


@INITIALIZERS.register("variance_scaling")
def _variance_scaling(
    scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal", **_: Any
) -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(scale=scale, mode=mode, distribution=distribution)


@INITIALIZERS.register("lsuv")
def _lsuv(gain: float = 1.0, **_: Any) -> keras.initializers.Initializer:
    # Mishkin & Matas 2016 start from orthonormal kernels; the data-driven rescaling (options `tol`,
    # `max_iter`) needs a batch, so the runner applies it after the build: see zoo.lsuv.
    return keras.initializers.Orthogonal(gain=gain)


def make_initializer(kind: str, **options: Any) -> keras.initializers.Initializer:
    """Builds the kernel initializer ``kind`` (options: ``gain``, ``scale``, ``mode``, ``distribution``)."""
    return INITIALIZERS.get(kind)(**options)


def make_bias_initializer(std: float = 0.0) -> keras.initializers.Initializer:
    """Zeros, or N(0, std^2) biases (sigma_b of Schoenholz et al. 2017)."""
    return keras.initializers.Zeros() if std == 0 else keras.initializers.RandomNormal(stddev=std)
