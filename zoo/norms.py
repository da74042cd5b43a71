"""Normalisation layers by name: none, batch (Ioffe & Szegedy 2015), layer (Ba et al. 2016), group (Wu & He 2018)."""

from __future__ import annotations

import keras
from keras import layers

from zoo.registry import Registry

NORMS: Registry = Registry("normalization")
NORMS.register("none", lambda name, dtype=None, groups=8: None)
# Moving statistics with momentum 0.9 (PyTorch's 0.1 update): Keras' default 0.99 still weighs its initial
# (0, 1) statistics by 0.99^200 = 13% after the ~200 steps of a digits run, so evaluation would use
# statistics the deep net never had (train accuracy 90%, validation at chance, in configs/normalization.yaml).
BATCH_NORM_MOMENTUM = 0.9
NORMS.register("batch", lambda name, dtype=None, groups=8: layers.BatchNormalization(
    momentum=BATCH_NORM_MOMENTUM, name=name, dtype=dtype))
NORMS.register("layer", lambda name, dtype=None, groups=8: layers.LayerNormalization(name=name, dtype=dtype))
NORMS.register(
    "group", lambda name, dtype=None, groups=8: layers.GroupNormalization(groups=groups, name=name, dtype=dtype)
)


def make_norm(kind: str, name: str, dtype: str | None = None, groups: int = 8) -> keras.layers.Layer | None:
    """Returns the normalisation layer ``kind`` named ``name``, or ``None`` for ``"none"``."""
    return NORMS.get(kind)(name=name, dtype=dtype, groups=groups)
