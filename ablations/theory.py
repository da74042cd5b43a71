"""``ablate theory``: the seed's tables, computed numerically with autodiff rather than typed in.

* Activation table: for every registered activation layer (:mod:`zoo.activations`), the derivative on a fine
  grid of pre-activations z in [-20, 20], taken with ``tf.GradientTape`` through the very layer the models use:
  maximum |derivative| (sigmoid 0.25, tanh 1: Glorot & Bengio 2010; the 1/gamma of Pascanu et al. 2013),
  derivative range, how each side saturates (hard zero, asymptotic, or not at all) and the interval of z
  where the derivative is at least 5% of its maximum (the probe's saturation threshold).
* Attenuation table: d^L for depths L (default 1, 5, 10, 15, 20, 50): the largest factor by which the
  back-propagated gradient can shrink through L layers whose activation derivative is at most d (with unit
  weights). An activation name stands for its computed maximum derivative, so ``sigmoid`` gives the 0.25^L
  bound that the report can overlay on sigmoid plots (:func:`attenuation_bound`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

DEFAULT_DEPTHS = (1, 5, 10, 15, 20, 50)
DEFAULT_FACTORS = ("sigmoid", "0.2")  # sigmoid's computed bound and the seed's 0.2
Z_MAX = 20.0
Z_POINTS = 400_000  # step ~1e-4; even, so z = 0 (where ReLU-type kinks have no derivative) is off the grid
SATURATED = 1e-3  # a side saturates when |d| there is below this fraction of the maximum derivative


def derivative(activation: str, z: np.ndarray, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(phi(z), phi'(z))`` of the registered activation layer, in float64, by autodiff."""
    import tensorflow as tf

    from zoo.activations import make_activation

    layer = make_activation(activation, f"theory_{activation}", "float64", **options)
    zt = tf.constant(np.asarray(z, dtype=np.float64).reshape(-1, 1))  # (N, 1): one unit, N examples (PReLU)
    with tf.GradientTape() as tape:
        tape.watch(zt)
        a = layer(zt)
    d = tape.gradient(a, zt)
    d = np.zeros_like(zt.numpy()) if d is None else d.numpy()
    return a.numpy().ravel(), d.ravel()


def _side(d_far: np.ndarray, d_edge: float, d_max: float) -> str:
    """How one side saturates. ``d_far``: derivatives at |z| >= 10 on that side. Hard: exactly 0 there (at
    |z| = 20, 1 - tanh^2 also rounds to 0 in float64, so the edge alone cannot tell hard from asymptotic)."""
    if np.all(d_far == 0.0):
        return "hard (d = 0)"
    if abs(d_edge) < SATURATED * d_max:
        return "asymptotic (d -> 0)"
    return f"none (d -> {d_edge:.3g})"


def activation_row(activation: str, **options: Any) -> dict[str, Any]:
    """One row of the activation table (see the module docstring)."""
    from ablations.instruments.activation import SATURATION_FRACTION

    z = np.linspace(-Z_MAX, Z_MAX, Z_POINTS)
    _, d = derivative(activation, z, **options)
    mag = np.abs(d)
    d_max = float(mag.max())
    live = z[mag >= SATURATION_FRACTION * d_max] if d_max > 0 else np.array([])
    return {
        "activation": activation,
        "max_derivative": d_max,
        "argmax_z": float(z[int(mag.argmax())]),
        "derivative_min": float(d.min()),
        "derivative_max": float(d.max()),
        "d_at_-20": float(d[0]),
        "d_at_+20": float(d[-1]),
        "negative_side": _side(d[z <= -Z_MAX / 2], float(d[0]), d_max),
        "positive_side": _side(d[z >= Z_MAX / 2], float(d[-1]), d_max),
        # Where |d| >= 5% of the maximum; +-inf where that reaches the end of the grid.
        "live_from": -math.inf if live.size and live[0] <= -Z_MAX else (float(live[0]) if live.size else math.nan),
        "live_to": math.inf if live.size and live[-1] >= Z_MAX else (float(live[-1]) if live.size else math.nan),
    }


def activation_table(activations: Iterable[str] | None = None,
                     options: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """The activation table for ``activations`` (default: every registered one), one row each."""
    from zoo.activations import ACTIVATIONS

    names = list(activations) if activations else ACTIVATIONS.names()
    for name in names:
        ACTIVATIONS.get(name)  # unknown names fail with the known ones listed
    return pd.DataFrame([activation_row(n, **(options or {}).get(n, {})) for n in names])


def resolve_factor(text: str) -> tuple[str, float]:
    """``"0.2"`` -> ("d=0.2", 0.2); an activation name -> ("sigmoid: d=0.25", its computed maximum derivative)."""
    try:
        value = float(text)
    except ValueError:
        value = float(activation_row(text)["max_derivative"])
        return f"{text}: d={value:.4g}", value
    if not value > 0:
        raise ValueError(f"an attenuation factor must be > 0 (or an activation name), got {text}")
    return f"d={text}", value


def attenuation_table(factors: Sequence[str] = DEFAULT_FACTORS,
                      depths: Sequence[int] = DEFAULT_DEPTHS) -> pd.DataFrame:
    """d^L for each factor (a number or an activation name) and depth L: rows L, one column per factor."""
    if any(int(L) < 1 for L in depths):
        raise ValueError(f"depths must be >= 1, got {list(depths)}")
    table = pd.DataFrame({"depth": [int(L) for L in depths]})
    for label, d in (resolve_factor(f) for f in factors):
        table[label] = [d ** int(L) for L in depths]
    return table


# Maximum derivatives with a closed form, so that the report (which never imports TensorFlow) draws the bound
# from here; tests/test_theory.py checks each against the autodiff value of activation_row.
CLOSED_FORM_MAX_DERIVATIVE = {"sigmoid": 0.25}  # sigmoid'(0) = 1/4 (Glorot & Bengio 2010)


def max_derivative(activation: str) -> float:
    """The activation's maximum |derivative|: its closed form where known, else computed by autodiff."""
    if activation in CLOSED_FORM_MAX_DERIVATIVE:
        return CLOSED_FORM_MAX_DERIVATIVE[activation]
    return float(activation_row(activation)["max_derivative"])


def attenuation_bound(activation: str, depths: Sequence[int]) -> np.ndarray:
    """(max derivative)^L for ``depths``: the bound to overlay on plots of that activation's gradients.

    Args:
        activation: a registered activation name (``sigmoid`` needs no TensorFlow: closed form).
        depths: numbers of layers L (0 gives 1).
    """
    d = max_derivative(activation)
    return np.array([d ** int(L) for L in depths], dtype=np.float64)
