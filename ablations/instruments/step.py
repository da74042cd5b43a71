"""Per-step scalars (``history.parquet``): loss, global gradient norm and learning rate."""

from __future__ import annotations

from typing import Any

from ablations.instruments.base import Column, Finish, Instrument, Reducer, StepContext, tf
from ablations.instruments.kernels import global_norm, num_replicas


class StepScalars(Instrument):
    """The step's global-batch loss, the L2 norm of all gradients together, and the learning rate in use.

    The gradient norm is that of the global gradients (unscaled under mixed precision), computed from the
    per-tensor norms so it stays exact for vanishing gradients; the learning rate is read before the update,
    so under a schedule it is the rate this step applied (Keras' ``optimizer.learning_rate`` at this step).
    """

    name = "step"
    table = "history"
    order = 0
    needs = frozenset({"grads"})
    columns = (
        Column("loss", "global-batch mean training loss of the step", "train/loss"),
        Column("global_grad_norm", "L2 norm of all gradients together (global batch, unscaled)",
               "train/global_grad_norm"),
        Column("lr", "learning rate applied at this step", "train/lr"),
    )

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        loss = red.sums(tf.reshape(tf.cast(ctx.loss, tf.float32), [1]))  # per-replica means: their mean
        grads = ctx.grad_norms(red)
        lr = tf.reshape(tf.cast(ctx.model.optimizer.learning_rate, tf.float32), [1])
        n_rep = num_replicas()

        def finish(r: Any) -> dict[str, Any]:
            return {"loss": (None, r(loss) / n_rep), "global_grad_norm": (None, tf.reshape(global_norm(r(grads)), [1])),
                    "lr": (None, lr)}

        return finish
