"""Mean-field signal propagation of wide random tanh nets, by Gaussian quadrature (no sampling, no TensorFlow).

Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, "Deep information propagation": in a net whose weights
have variance sigma_w^2 / fan_in and whose biases have variance sigma_b^2, the pre-activation variance q of
every layer follows ``q_{l+1} = sigma_w^2 E_z[phi(sqrt(q_l) z)^2] + sigma_b^2`` (z ~ N(0, 1)) to a fixed point
q*, and ``chi_1 = sigma_w^2 E_z[phi'(sqrt(q*) z)^2]`` is the factor by which the squared back-propagated
gradient grows per layer toward the input: ordered phase (vanishing) for chi_1 < 1, chaotic (exploding) for
chi_1 > 1, critical at chi_1 = 1. ``ablate reproduce`` compares these numbers with measured gradients.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

QUADRATURE_POINTS = 161  # Gauss-Hermite nodes: the integrands are smooth, 161 nodes are exact to ~1e-14
_PHIS = {
    "tanh": (np.tanh, lambda h: 1.0 - np.tanh(h) ** 2),
}


@lru_cache(maxsize=None)
def _nodes() -> tuple[np.ndarray, np.ndarray]:
    """Probabilists' Gauss-Hermite nodes and weights normalised to the standard Gaussian measure."""
    x, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_POINTS)
    return x, w / math.sqrt(2.0 * math.pi)


def gaussian_mean(fn, q: float) -> float:
    """``E_z[fn(sqrt(q) z)]`` for z ~ N(0, 1), by Gauss-Hermite quadrature."""
    x, w = _nodes()
    return float(np.sum(w * fn(math.sqrt(max(q, 0.0)) * x)))


def _phi(name: str):
    if name not in _PHIS:
        raise ValueError(f"mean-field functions know {', '.join(_PHIS)}, not '{name}'")
    return _PHIS[name]


def qstar(sigma_w2: float, sigma_b2: float, phi: str = "tanh", tol: float = 1e-13, max_iter: int = 10_000) -> float:
    """The fixed point q* of the length map (Schoenholz et al. 2017, eq. 3), by fixed-point iteration.

    Raises:
        ValueError: a variance is negative, or the iteration does not settle (it always does for tanh).
    """
    if sigma_w2 < 0 or sigma_b2 < 0:
        raise ValueError(f"variances must be >= 0, got sigma_w2={sigma_w2}, sigma_b2={sigma_b2}")
    f, _ = _phi(phi)
    q = 1.0
    for _ in range(max_iter):
        nxt = sigma_w2 * gaussian_mean(lambda h: f(h) ** 2, q) + sigma_b2
        if abs(nxt - q) < tol * max(1.0, q):
            return float(nxt)
        q = nxt
    raise ValueError(f"q* did not converge for sigma_w2={sigma_w2}, sigma_b2={sigma_b2}")


def chi1(sigma_w2: float, sigma_b2: float, phi: str = "tanh") -> float:
    """``chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2]`` (Schoenholz et al. 2017, eq. 5)."""
    _, df = _phi(phi)
    return float(sigma_w2 * gaussian_mean(lambda h: df(h) ** 2, qstar(sigma_w2, sigma_b2, phi)))


def critical_sigma_w2(sigma_b2: float, phi: str = "tanh", lo: float = 0.5, hi: float = 10.0) -> float:
    """The sigma_w^2 at which chi_1 = 1 for this sigma_b^2 (the order-to-chaos line), by bisection."""
    g = lambda s: chi1(s, sigma_b2, phi) - 1.0  # noqa: E731 - increasing in sigma_w^2 for tanh
    if g(lo) > 0 or g(hi) < 0:
        raise ValueError(f"chi_1 = 1 is not bracketed by sigma_w2 in [{lo}, {hi}] for sigma_b2={sigma_b2}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)
