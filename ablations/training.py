"""Keras objects from config sections: optimizers (with clipping), losses, strategies."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


def make_optimizer(cfg: Any) -> keras.optimizers.Optimizer:
    """A Keras optimizer from :class:`~ablations.config.OptimizerConfig` (clipping included)."""
    kw: dict[str, Any] = {"learning_rate": cfg.learning_rate}
    for k in ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay"):
        if getattr(cfg, k) is not None:
            kw[k] = getattr(cfg, k)
    if cfg.name == "sgd":
        return keras.optimizers.SGD(momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=cfg.momentum, **kw)
    if cfg.name == "adam":
        return keras.optimizers.Adam(**kw)
    if cfg.name == "adamw":
        kw.setdefault("weight_decay", 0.004)
        return keras.optimizers.AdamW(**kw)
    if cfg.name == "adagrad":
        return keras.optimizers.Adagrad(**kw)
    raise ValueError(f"unknown optimizer {cfg.name}")


def make_loss(name: str, task: str) -> tuple[keras.losses.Loss, list[Any]]:
    """The loss (models output logits) and metrics for a task; ``auto`` picks from the dataset's task."""
    if name == "auto":
        name = "sparse_categorical_crossentropy" if task == "classification" else "mse"
    if name == "sparse_categorical_crossentropy":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    return keras.losses.MeanSquaredError(), []


def make_strategy(cfg: Any) -> tf.distribute.Strategy:
    """The tf.distribute strategy for :class:`~ablations.config.RuntimeConfig` (``default`` for now)."""
    return tf.distribute.get_strategy()
