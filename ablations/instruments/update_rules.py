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

from typing import Any, NamedTuple

from ablations import compat
from ablations.instruments.base import tf
from ablations.instruments.kernels import global_norm

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


class Steps(NamedTuple):
    """The step the optimizer added to each variable: ``sign * scale * q_i`` (``scale`` None: 1).

    Kept apart so the norms take the fewest element-wise ops (the sign and the scale apply to the norms);
    for the rules in :data:`CLIPPED_AFTER_NORM` the step is also scaled by a per-tensor clip factor.
    """

    q: list[Any]
    scale: Any
    sign: float


def optimizer_steps(rule: str, optimizer: Any, variables: list[Any], grads: list[Any], lr: Any) -> Steps:
    """The optimizer's own step of each variable this step (float32), read after the update.

    Args:
        rule: from :func:`update_source`, not ``copy``.
        grads: the global-batch gradients (float32, unscaled), used by the rules without a velocity.
        lr: the learning rate this step applied (read before the update).
    """
    def slot(v: Any, name: str) -> Any:
        return tf.cast(compat.optimizer_slot(optimizer, v, name), tf.float32)

    if rule == "sgd":  # w <- w - lr clip(g)
        return Steps(list(grads), lr, -1.0)
    if rule == "momentum":  # Keras: m <- momentum m - lr clip(g); w <- w + m
        return Steps([tf.cast(compat.sgd_momentum(optimizer, v), tf.float32) for v in variables], None, 1.0)
    if rule == "adam":  # w <- w - alpha m / (sqrt(v) + eps), alpha = lr sqrt(1 - b2^t) / (1 - b1^t)
        t = tf.cast(optimizer.iterations, tf.float32)
        alpha = lr * tf.sqrt(1.0 - optimizer.beta_2 ** t) / (1.0 - optimizer.beta_1 ** t)
        return Steps([slot(v, "momentums") / (tf.sqrt(slot(v, "velocities")) + optimizer.epsilon)
                      for v in variables], alpha, -1.0)
    if rule == "rms_momentum":  # m <- momentum m + lr clip(g) / sqrt(den); w <- w - m
        return Steps([slot(v, "momentums") for v in variables], None, -1.0)
    if rule == "rmsprop":  # w <- w - lr clip(g) / sqrt(den), den = v (- mean^2 if centred) + eps
        def den(v: Any) -> Any:
            d = slot(v, "velocities")
            return (d - tf.square(slot(v, "average_gradients")) if optimizer.centered else d) + optimizer.epsilon

        return Steps([g * tf.math.rsqrt(den(v)) for g, v in zip(grads, variables)], lr, -1.0)
    raise ValueError(f"no update rule {rule!r}")


def clip_factors(optimizer: Any, grad_norms: Any) -> Any:
    """The factor Keras' norm clipping scales each gradient by (1 where it does not clip), per tensor."""
    if optimizer.clipnorm:
        return tf.minimum(1.0, float(optimizer.clipnorm) / grad_norms)
    if optimizer.global_clipnorm:
        return tf.ones_like(grad_norms) * tf.minimum(1.0, optimizer.global_clipnorm / global_norm(grad_norms))
    return tf.ones_like(grad_norms)


def with_decay(steps: Steps, decay: list[Any], variables: list[Any]) -> tuple[list[Any], Any]:
    """The tensors whose norms, times the returned per-tensor factors, are the applied updates' norms.

    Keras decays first (``w_mid = w_old (1 - c)``), then steps (``w = w_mid + d``), so the update is
    ``u = (d - c w) / (1 - c)`` with ``w`` the weights after the update. With ``d = sign * scale * q``:
    ``|u| = |scale| |q + k w| / (1 - c)``, ``k = -sign c / scale``: two element-wise ops per decayed tensor.
    """
    scale = 1.0 if steps.scale is None else steps.scale
    tensors, factors = [], []
    for q, c, v in zip(steps.q, decay, variables):
        if c is None:
            tensors.append(q)
            factors.append(tf.abs(scale) * tf.ones([]))
        else:
            tensors.append(q + (-steps.sign * c / scale) * tf.cast(v, tf.float32))
            factors.append(tf.abs(scale) / (1.0 - c))
    return tensors, tf.stack(factors)
