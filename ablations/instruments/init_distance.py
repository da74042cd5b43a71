"""Distance of every weight tensor from its initial value, absolute and relative to the initial norm.

Schneider, Balles & Hennig 2021, "Cockpit: a practical debugging tool for the training of deep neural
networks" (the "distance" instrument); Nagarajan & Kolter 2019, "Generalization in deep networks: the role
of distance from initialization".

Weights are identical on every replica (mirrored), so nothing here is reduced over replicas.

The instrument (``capture.instruments.init_distance: true``, opt-in) adds ``init_distance`` and
``init_distance_ratio`` to ``params.parquet`` at the probe's cadence (``capture.every``), or every ``every``
steps (``capture.instruments.init_distance: {every: 64}``, a multiple of it; NaN on the other captures). Opt-in because it keeps
a copy of every trainable tensor for the whole run (the initial weights: one model's worth of memory) and
reads every weight once more per captured step. ``w_0`` is the weights when the probe was built (after LSUV
for ``initializer: lsuv``; for :class:`ablations.Probe`, when you wrapped the model); the copy is a variable of
the probed model, so a resumed arm keeps measuring from the same ``w_0``. ``w_t`` is read before step t's
update, like ``weight_norm``, so the first captured step reads 0.
"""

from __future__ import annotations

from typing import Any, Sequence

from ablations.instruments.base import Column, EveryOptions, Finish, Instrument, Reducer, StepContext, keras
from ablations.instruments.kernels import norms
from ablations.lazy import tf

DISTANCE_STATS = ("init_distance", "init_distance_ratio")


def initial_copy(variables: Sequence[Any], name: str = "w0") -> list[tf.Variable]:
    """Non-trainable copies of ``variables``' current values (create once, outside the step; under a
    strategy, inside its scope, so the copies are mirrored like the weights)."""
    return [tf.Variable(tf.convert_to_tensor(v), trainable=False, name=f"{name}_{i}")
            for i, v in enumerate(variables)]


def init_distances(weights: Sequence[Any], initial: Sequence[Any]) -> tf.Tensor:
    """``[n, 2]`` float32: ``||w_t - w_0||`` and ``||w_t - w_0|| / ||w_0||`` per tensor.

    The difference is taken in the variable's dtype before the float32 norm (casting first would round
    float64 weights and swamp a small distance). Norms go through :func:`ablations.instruments.kernels.norms`, so
    distances far below float32's squared range (a barely moved layer) stay exact instead of reading 0. The
    ratio is NaN for a tensor initialised to zero (biases): use the absolute distance there.
    """
    weights = [tf.convert_to_tensor(w) for w in weights]
    initial = [tf.convert_to_tensor(w0) for w0 in initial]
    out = norms([w - tf.cast(w0, w.dtype) for w, w0 in zip(weights, initial)] + initial)
    n = len(weights)
    dist, w0_norm = out[:n], out[n:]
    ratio = tf.where(w0_norm > 0, dist / tf.where(w0_norm > 0, w0_norm, 1.0), float("nan"))
    return tf.stack([dist, ratio], axis=1)


class InitDistance(Instrument):
    """Per trainable tensor: distance from its initial value, absolute and relative (Cockpit's ``distance``)."""

    name = "init_distance"
    table = "params"
    order = 15
    default = False
    Opts = EveryOptions
    columns = (
        Column("init_distance", "||w_t - w_0||: L2 distance of the tensor (before step t's update) from its value "
                                "when the probe was built (capture.instruments.init_distance)",
               "init_distance/{layer}/{param}"),
        Column("init_distance_ratio", "init_distance / ||w_0|| (NaN for a tensor initialised to 0, e.g. biases)",
               "init_distance_ratio/{layer}/{param}"),
    )

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._initial: list[Any] | None = None

    def state(self) -> list[Any]:
        if self._initial is None:
            self._initial = [keras.Variable(tf.convert_to_tensor(v), dtype=v.dtype, trainable=False,
                                         name=f"init_distance_w0_{i}")
                             for i, v in enumerate(self.spec.net.trainable_variables)]
        return self._initial

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        d = init_distances(ctx.variables, self.state())  # [n, 2]
        ctx.before_update.append(d)  # read before the update, without a copy of the weights
        return lambda r: {"init_distance": (None, d[:, 0]), "init_distance_ratio": (None, d[:, 1])}
