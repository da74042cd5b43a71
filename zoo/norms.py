"""Normalisation layers by name: none, batch (Ioffe & Szegedy 2015), layer (Ba et al. 2016), group (Wu & He 2018).

Keras is imported inside the factories, so the names are known without TensorFlow. A norm's settings are the
builders' ``norm_groups`` (group norm only) and ``norm_position`` (any norm but ``none``); :mod:`zoo.schema`
refuses them where the chosen norm ignores them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from zoo.registry import Registry

if TYPE_CHECKING:
    import keras

NORMS: Registry[Callable[..., Optional["keras.layers.Layer"]]] = Registry("normalization")
# Moving statistics with momentum 0.9 (PyTorch's 0.1 update): Keras' default 0.99 still weighs its initial
# (0, 1) statistics by 0.99^200 = 13% after the ~200 steps of a digits run, so evaluation would use
# statistics the deep net never had (train accuracy 90%, validation at chance, in configs/normalization.yaml).
BATCH_NORM_MOMENTUM = 0.9


@NORMS.register("none")
def _none(name: str, dtype: str | None = None, groups: int = 8) -> None:
    return None


@NORMS.register("batch")
def _batch(name: str, dtype: str | None = None, groups: int = 8) -> "keras.layers.Layer":
    from keras import layers

    return layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=name, dtype=dtype)


@NORMS.register("layer")
def _layer(name: str, dtype: str | None = None, groups: int = 8) -> "keras.layers.Layer":
    from keras import layers

    return layers.LayerNormalization(name=name, dtype=dtype)


@NORMS.register("group")
def _group(name: str, dtype: str | None = None, groups: int = 8) -> "keras.layers.Layer":
    from keras import layers

    return layers.GroupNormalization(groups=groups, name=name, dtype=dtype)


def make_norm(kind: str, name: str, dtype: str | None = None, groups: int = 8) -> "keras.layers.Layer | None":
    """Returns the normalisation layer ``kind`` named ``name``, or ``None`` for ``"none"``."""
    return NORMS.get(kind)(name=name, dtype=dtype, groups=groups)
