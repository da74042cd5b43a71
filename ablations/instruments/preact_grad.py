"""dL/d(pre-activation) per block (``blocks.act_grad_norm``): the back-propagated signal itself.

Glorot & Bengio 2010: the gradient w.r.t. the pre-activations shrinks layer by layer toward the input while
weight gradients may not, so a tool that logs only weight gradients misses it. The tap is the output of the
block's first linear layer (the zoo names it ``block_<i>_linear``); where the activation is fused into that
layer the tap is its output, i.e. the gradient after the activation.
"""

from __future__ import annotations

from typing import Any

from ablations.instruments.base import Column, Finish, Instrument, Reducer, StepContext, rows_with, tf


class PreactGrad(Instrument):
    """L2 norm of dL/dz at each block's first linear layer, for the global batch."""

    name = "preact_grad"
    table = "blocks"
    order = 20
    grad_taps = ("pre",)
    columns = (Column("act_grad_norm", "L2 norm of dL/d(pre-activation) of the block's first linear layer",
                      "preact_grad_norm/{block}"),)

    def applies(self) -> bool:
        return bool(rows_with(self.spec, "pre"))

    def taps(self) -> dict[str, list[Any]]:
        return {"pre": [t for _, t in rows_with(self.spec, "pre")]}

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        rows = [row for row, _ in rows_with(self.spec, "pre")]
        # Switched-off blocks' exact zeros must not send the step through the underflow rescue.
        skip = tf.gather(ctx.off, rows) if ctx.off is not None else None
        handle = red.norms(ctx.tap_grads["pre"], skip=skip, local=True)
        return lambda r: {"act_grad_norm": (rows, r(handle))}
