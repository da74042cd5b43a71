"""Residual branch ratio per block (``blocks.branch_ratio``): ||branch|| / ||skip|| at the block's sum.

He et al. 2016; a branch much larger than its skip path means the block no longer acts as a near-identity
(Fixup, Zhang et al. 2019, and ReZero scale the branch down for that reason).
"""

from __future__ import annotations

from typing import Any

from ablations.instruments.base import Column, Finish, Instrument, Reducer, StepContext, tf
from ablations.instruments.kernels import sq_sums


class BranchRatio(Instrument):
    """||residual branch|| / ||skip|| at each block's 2-input residual sum, global batch."""

    name = "residual"
    table = "blocks"
    order = 40
    columns = (Column("branch_ratio", "||residual branch|| / ||skip|| at the block's sum"),)

    def _rows(self) -> list[int]:
        return [row for row, v in enumerate(self.spec.views) if v.skip is not None and v.branch is not None]

    def applies(self) -> bool:
        return bool(self._rows())

    def taps(self) -> dict[str, list[Any]]:
        rows = self._rows()
        return {"skip": [self.spec.views[r].skip for r in rows], "branch": [self.spec.views[r].branch for r in rows]}

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        rows, k = self._rows(), len(self._rows())
        handle = red.sums(sq_sums(ctx.taps["branch"] + ctx.taps["skip"]))  # squares add over replicas
        return lambda r: {"branch_ratio": (rows, tf.sqrt(r(handle)[:k] / r(handle)[k:]))}
