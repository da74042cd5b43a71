"""Block scalars (``blocks.alpha``, ``blocks.active``) and THE definition of a switched-off block.

ReZero's residual weight alpha (Bachlechner et al. 2020) and the share of the batch whose stochastic-depth
branch was on (Huang et al. 2016) are scalar weights of a block's layers, read before the update. A block is
*switched off* at a step when its branch gets no gradient by design: its stochastic-depth branch was off for
the whole batch (``active == 0``) or its ReZero weight is exactly 0 (``alpha == 0``, its initial value). A
zero gradient there is not a vanishing gradient: the underflow rescue skips it in graph, and ratios, decay
rates and verdicts leave such (step, block) pairs out (:func:`drop_inactive`); the stored tables keep them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ablations.lazy import pd

from ablations.instruments.base import Column, Finish, Instrument, ProbeSpec, Reducer, StepContext, tf
from ablations.instruments.kernels import num_replicas

SCALARS = ("alpha", "active")


def switched_off(alpha: Any, active: Any) -> Any:
    """The one rule, for NumPy arrays and tensors alike: no gradient in the branch by design."""
    return (active == 0) | (alpha == 0)


def scalar_pairs(spec: ProbeSpec, name: str) -> list[tuple[int, Any]]:
    """``[(block row, float32 value)]`` of the blocks that have the scalar weight ``name``, read now.

    A block with several (a ReZero transformer layer: one alpha per sub-layer) gives, for ``alpha``, the one
    of largest magnitude, signed (so the block is switched off only when every alpha is 0, and a moving
    alpha is never hidden behind one that stays at 0); for ``active``, their mean. Each alpha is also a row
    of ``params.parquet`` (``weight_norm`` = |alpha|).
    """
    out = []
    for row, view in enumerate(spec.views):
        weights = view.scalars.get(name)
        if not weights:
            continue
        values = tf.stack([tf.cast(tf.convert_to_tensor(w), tf.float32) for w in weights])
        if len(weights) == 1:
            value = values[0]
        elif name == "alpha":
            value = tf.gather(values, tf.argmax(tf.abs(values)))
        else:
            value = tf.reduce_mean(values)
        out.append((row, value))
    return out


def off_mask(spec: ProbeSpec) -> Any:
    """[n_blocks] bool tensor of the blocks switched off right now (read before the update), or None."""
    pairs = {name: scalar_pairs(spec, name) for name in SCALARS}
    if not any(pairs.values()):
        return None
    n = spec.n_blocks

    def column(name: str) -> Any:
        if not pairs[name]:
            return tf.fill([n], float("nan"))
        values = tf.stack([v for _, v in pairs[name]])
        return tf.tensor_scatter_nd_update(tf.fill([n], float("nan")),
                                           tf.constant([[row] for row, _ in pairs[name]], tf.int32), values)

    return switched_off(column("alpha"), column("active"))


def off_frame(blocks: pd.DataFrame | None) -> pd.DataFrame:
    """The (step, depth) pairs of switched-off blocks in a stored ``blocks`` table."""
    if blocks is None or blocks.empty:
        return pd.DataFrame(columns=["step", "depth"])
    nan = np.full(len(blocks), np.nan)
    alpha = blocks["alpha"].to_numpy() if "alpha" in blocks else nan
    active = blocks["active"].to_numpy() if "active" in blocks else nan
    return blocks.loc[switched_off(alpha, active), ["step", "depth"]]


def inactive_rows(params: pd.DataFrame, blocks: pd.DataFrame | None) -> np.ndarray:
    """Bool per row of ``params``: block tensors of switched-off blocks at that step."""
    off = off_frame(blocks)
    if off.empty or params.empty:
        return np.zeros(len(params), bool)
    hit = pd.MultiIndex.from_frame(params[["step", "depth"]]).isin(pd.MultiIndex.from_frame(off))
    return hit & (params["role"] == "block").to_numpy()


def drop_inactive(params: pd.DataFrame, blocks: pd.DataFrame | None) -> pd.DataFrame:
    """``params`` without the rows of switched-off blocks (see the module docstring)."""
    hit = inactive_rows(params, blocks)
    return params[~hit] if hit.any() else params


class BlockScalars(Instrument):
    """ReZero's alpha and stochastic depth's active share, per block, before the update."""

    name = "block_scalars"
    table = "blocks"
    order = 50
    columns = (
        Column("alpha", "a ReZero block's residual weight, before the update"),
        Column("active", "share of the batch whose stochastic-depth branch was on (0 or 1 in batch mode)"),
    )

    def applies(self) -> bool:
        return any(scalar_pairs(self.spec, n) for n in SCALARS)

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        handles = {}
        for name in SCALARS:
            pairs = scalar_pairs(self.spec, name)
            if pairs:
                # Replicas hold the same alpha; each draws its own stochastic-depth mask: the mean over replicas.
                handles[name] = ([row for row, _ in pairs],
                                 red.sums(tf.stack([v for _, v in pairs])))
        n_rep = num_replicas()
        return lambda r: {name: (rows, r(h) / n_rep) for name, (rows, h) in handles.items()}
