"""The update an optimizer applied, read from its own state after the step instead of a pre-update copy.

A copy of every weight costs a model's worth of memory on captured steps, which is what limits big models on
a GPU. Where Keras' step can be recomputed exactly from what the optimizer keeps, the update norm needs no
copy: SGD (plain: lr times the clipped gradient; with momentum: its velocity), Adam and AdamW (their moments),
RMSprop (its velocity, centred mean and momentum), each with Keras' decoupled weight decay. "Exactly" means
as Keras 3.15 computes the step (``update_step`` of SGD, Adam, RMSprop; ``Optimizer._apply_weight_decay``,
which shrinks a weight by ``1 - lr * weight_decay`` before the step); it equals the copy-based value up to the
float32 rounding of the stored weights. Anything else keeps the copy.
"""

from __future__ import annotations

from typing import Any

from ablations import compat
from ablations.instruments.base import tf

# Rules: sgd (no momentum), momentum (SGD with momentum), adam (Adam, AdamW), rmsprop (no momentum),
# rms_momentum (RMSprop with momentum). Per-tensor clipping enters sgd and rmsprop after the norm (a factor per
# tensor); the velocity-based rules already hold the clipped step.
CLIPPED_AFTER_NORM = ("sgd", "rmsprop")


def update_source(optimizer: Any, wanted: str = "auto") -> str:
    """``copy``, or the rule the update can be read from exactly (``sgd``, ``momentum``, ``adam``, ``rmsprop``,
    ``rms_momentum``).

    Not exact, so ``copy``: gradient accumulation, EMA, element-wise clipping, Nesterov, AMSGrad, loss scaling
    (a ``LossScaleOptimizer`` wraps the optimizer), and weight decay together with norm clipping on the rules
    that clip after the norm (the decay mixes into the step before the norm is taken).
    """
    if wanted == "copy" or optimizer is None:
        return "copy"
    import keras

    plain = not (getattr(optimizer, "gradient_accumulation_steps", None) or getattr(optimizer, "use_ema", False)
                 or getattr(optimizer, "clipvalue", None))
    kind, rule = type(optimizer), "copy"
    if plain and kind is keras.optimizers.SGD and not optimizer.nesterov:
        rule = "momentum" if optimizer.momentum else "sgd"
    elif plain and kind in (keras.optimizers.Adam, keras.optimizers.AdamW) and not optimizer.amsgrad:
        rule = "adam"
    elif plain and kind is keras.optimizers.RMSprop:
        rule = "rms_momentum" if optimizer.momentum else "rmsprop"
    clipped = getattr(optimizer, "clipnorm", None) or getattr(optimizer, "global_clipnorm", None)
    if rule in CLIPPED_AFTER_NORM and clipped and getattr(optimizer, "weight_decay", None):
        rule = "copy"
    if wanted == "slots" and rule == "copy":
        raise ValueError(f"capture.instruments.param_norms.update_source: slots cannot give the exact update of "
                         f"{type(optimizer).__name__} with this configuration; use auto or copy")
    return rule


def decay_factors(optimizer: Any, variables: list[Any], lr: Any) -> list[Any]:
    """``lr * weight_decay`` for each variable Keras decays this step, None for the others (or no decay)."""
    wd = getattr(optimizer, "weight_decay", None)
    if not wd:
        return [None] * len(variables)
    c = lr * tf.cast(wd, tf.float32)
    return [c if compat.uses_weight_decay(optimizer, v) else None for v in variables]


def optimizer_steps(rule: str, optimizer: Any, variables: list[Any], grads: list[Any],
                    lr: Any) -> tuple[list[Any], Any]:
    """``(q, scale)``: the step the optimizer added to each variable this step is ``scale * q_i`` (signed,
    float32), read after the update; for the rules in :data:`CLIPPED_AFTER_NORM` it is ``lr * clip_i * q_i``
    with a per-tensor clip factor the caller applies (``scale`` is ``lr``).

    Args:
        rule: from :func:`update_source`, not ``copy``.
        grads: the global-batch gradients (float32, unscaled), used by the rules without a velocity.
        lr: the learning rate this step applied (read before the update).
    """
    def slot(v: Any, name: str) -> Any:
        return tf.cast(compat.optimizer_slot(optimizer, v, name), tf.float32)

    if rule == "sgd":
        return [-g for g in grads], lr
    if rule == "momentum":  # Keras: m <- momentum m - lr g; w <- w + m
        return [tf.cast(compat.sgd_momentum(optimizer, v), tf.float32) for v in variables], None
    if rule == "adam":  # w <- w - alpha m / (sqrt(v) + eps), alpha = lr sqrt(1 - b2^t) / (1 - b1^t)
        t = tf.cast(optimizer.iterations, tf.float32)
        alpha = lr * tf.sqrt(1.0 - optimizer.beta_2 ** t) / (1.0 - optimizer.beta_1 ** t)
        return [-slot(v, "momentums") / (tf.sqrt(slot(v, "velocities")) + optimizer.epsilon)
                for v in variables], alpha
    if rule == "rms_momentum":  # m <- momentum m + lr g / sqrt(den); w <- w - m
        return [-slot(v, "momentums") for v in variables], None
    if rule == "rmsprop":  # w <- w - lr g / sqrt(den), den = v (- mean^2 if centred) + eps
        def den(v: Any) -> Any:
            d = slot(v, "velocities")
            return (d - tf.square(slot(v, "average_gradients")) if optimizer.centered else d) + optimizer.epsilon

        return [-g / tf.sqrt(den(v)) for g, v in zip(grads, variables)], lr
    raise ValueError(f"no update rule {rule!r}")


def clip_factors(optimizer: Any, grad_norms: Any) -> Any:
    """The factor Keras' norm clipping scales each gradient by (1 where it does not clip), per tensor."""
    from ablations.instruments.kernels import global_norm

    if optimizer.clipnorm:
        return tf.minimum(1.0, float(optimizer.clipnorm) / grad_norms)
    if optimizer.global_clipnorm:
        return tf.ones_like(grad_norms) * tf.minimum(1.0, optimizer.global_clipnorm / global_norm(grad_norms))
    return tf.ones_like(grad_norms)


def with_decay(steps: list[Any], scale: Any, decay: list[Any], variables: list[Any]) -> list[Any]:
    """The applied updates ``u_i = (d_i - c_i w_i) / (1 - c_i)`` from the optimizer's steps ``d = scale * q``,
    the decay factors ``c`` and the weights after the update (Keras decays first: ``w_mid = w_old (1 - c)``,
    then ``w = w_mid + d``)."""
    out = []
    for q, c, v in zip(steps, decay, variables):
        d = q if scale is None else scale * q
        out.append(d if c is None else (d - c * tf.cast(v, tf.float32)) / (1.0 - c))
    return out
