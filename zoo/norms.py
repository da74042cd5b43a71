"""Normalisation layers by name: none, batch (Ioffe & Szegedy 2015), layer (Ba et al. 2016), group (Wu & He 2018)."""

from __future__ import annotations

import keras
from keras import layers

from zoo.registry import Registry

NORMS: Registry = Registry("normalization")
NORMS.register("none", lambda name, dtype=None, groups=8: None)
NORMS.register("batch", lambda name, dtype=None, groups=8: layers.BatchNormalization(name=name, dtype=dtype))
NORMS.register("layer", lambda name, dtype=None, groups=8: layers.LayerNormalization(name=name, dtype=dtype))
NORMS.register(
    "group", lambda name, dtype=None, groups=8: layers.GroupNormalization(groups=groups, name=name, dtype=dtype)
)


def make_norm(kind: str, name: str, dtype: str | None = None, groups: int = 8) -> keras.layers.Layer | None:
    """Returns the normalisation layer ``kind`` named ``name``, or ``None`` for ``"none"``."""
    return NORMS.get(kind)(name=name, dtype=dtype, groups=groups)
