"""Keras objects from config sections: learning-rate schedules, optimizers (with clipping), losses."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="gradzoo")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps`` steps, then ``after`` (a schedule or a constant).

    Step ``s < warmup_steps`` gets ``peak * (s + 1) / warmup_steps`` (never 0); step ``s`` after the warm-up
    gets ``after(s - warmup_steps)``, so the schedule proper starts from its own step 0.
    """

    def __init__(self, after: Any, peak: float, warmup_steps: int):
        self.after, self.peak, self.warmup_steps = after, float(peak), int(warmup_steps)

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / float(self.warmup_steps)
        rest = self.after(step - self.warmup_steps) if callable(self.after) else tf.constant(self.after, tf.float32)
        return tf.where(step < self.warmup_steps, warm, tf.cast(rest, tf.float32))

    def get_config(self) -> dict[str, Any]:
        after = keras.saving.serialize_keras_object(self.after) if callable(self.after) else self.after
        return {"after": after, "peak": self.peak, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LinearWarmup":
        after = config["after"]
        after = keras.saving.deserialize_keras_object(after) if isinstance(after, dict) else after
        return cls(after, config["peak"], config["warmup_steps"])


def make_schedule(cfg: Any, learning_rate: float, total_steps: int | None) -> Any:
    """The learning rate (a float or a Keras ``LearningRateSchedule``) of a :class:`ScheduleConfig`.

    Args:
        cfg: the schedule section.
        learning_rate: the peak rate.
        total_steps: optimizer steps of the whole run (``step`` milestones and ``cosine`` need it).
    """
    schedules = keras.optimizers.schedules
    if cfg.name != "constant" and not total_steps:
        raise ValueError(f"learning-rate schedule '{cfg.name}' needs the run's total number of steps")
    span = max(int(total_steps or 0) - cfg.warmup_steps, 1)  # steps the schedule proper covers
    if cfg.name == "constant":
        rate: Any = learning_rate
    elif cfg.name == "step":
        # PiecewiseConstantDecay keeps values[0] while step <= boundary: step round(m * span) is the first
        # step at the reduced rate.
        bounds = [max(int(round(m * span)) - 1, 0) for m in cfg.milestones]
        rate = schedules.PiecewiseConstantDecay(bounds, [learning_rate * cfg.gamma**k for k in range(len(bounds) + 1)])
    elif cfg.name == "cosine":
        rate = schedules.CosineDecay(learning_rate, decay_steps=span, alpha=cfg.min_fraction)
    else:
        raise ValueError(f"unknown learning-rate schedule '{cfg.name}'; known: constant, step, cosine")
    return LinearWarmup(rate, learning_rate, cfg.warmup_steps) if cfg.warmup_steps else rate


def make_optimizer(cfg: Any, total_steps: int | None = None) -> keras.optimizers.Optimizer:
    """A Keras optimizer from :class:`~ablations.config.OptimizerConfig` (clipping and schedule included).

    ``total_steps`` (epochs x steps per epoch) places the schedule's milestones and cosine decay.
    """
    schedule = getattr(cfg, "schedule", None)
    lr = make_schedule(schedule, cfg.learning_rate, total_steps) if schedule is not None else cfg.learning_rate
    kw: dict[str, Any] = {"learning_rate": lr}
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


@keras.saving.register_keras_serializable(package="gradzoo")
class OneHotMeanSquaredError(keras.losses.Loss):
    """Mean squared error between the outputs and one-hot targets built from integer class labels.

    The square loss of classification studies of the edge of stability (Cohen et al. 2021, "Gradient descent on
    neural networks typically occurs at the edge of stability": their MSE runs keep the sharpness at 2/lr,
    where cross-entropy's falls late in training). Mean over classes, like Keras' ``mse``. Without it, Keras'
    ``mse`` between labels ``[B]`` and outputs ``[B, classes]`` broadcasts, and a net would be trained to
    output the class index in every unit.
    """

    def __init__(self, name: str = "one_hot_mse", **kw: Any):
        super().__init__(name=name, **kw)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        target = tf.one_hot(labels, depth=tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        return tf.reduce_mean(tf.square(tf.reshape(y_pred, tf.shape(target)) - target), axis=-1)


def loss_problem(name: str, task: str, dataset: str = "the dataset") -> str | None:
    """Why ``train.loss`` ``name`` cannot train on a dataset of this task, or None."""
    if name == "sparse_categorical_crossentropy" and task != "classification":
        return (f"train.loss sparse_categorical_crossentropy needs class labels, but {dataset} has {task} "
                "targets: use mse, or auto (which picks it)")
    return None


def make_loss(name: str, task: str) -> tuple[keras.losses.Loss, list[Any]]:
    """The loss (models output logits) and metrics for a task; ``auto`` picks from the dataset's task.

    ``mse`` on a classification dataset is the square loss against one-hot targets (accuracy still reported).

    Raises:
        ValueError: cross-entropy on a regression dataset (Keras would cast the targets to class ids and
            train to a meaningless loss; :func:`ablations.preflight.check_data` refuses it before any arm).
    """
    problem = loss_problem(name, task)
    if problem:
        raise ValueError(problem)
    if name == "auto":
        name = "sparse_categorical_crossentropy" if task == "classification" else "mse"
    if name == "sparse_categorical_crossentropy":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    if task == "classification":
        return OneHotMeanSquaredError(), ["accuracy"]
    return keras.losses.MeanSquaredError(), []
