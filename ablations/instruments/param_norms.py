"""Per-tensor norms (``params.parquet``): gradient, weight, applied update, update/weight ratio; and the
per-block weight-gradient series they define: first/last-block ratio and the gradient-decay rate.

The update is the change the optimizer actually applied (clipping, momentum, Adam included): the weights
after the update minus a copy taken before it. The decay rate (decades of kernel gradient lost per block,
least squares over blocks) is computed here once, stored in ``history.grad_decay_rate`` and the summary, and
read by the report and the verdicts (AUTOTRAINER-style ratio: Zhang et al. 2021).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from ablations.lazy import pd

from ablations.instruments.base import Column, Finish, Instrument, Options, Reducer, StepContext, tf
from ablations.instruments.kernels import num_replicas, sq_sums
from ablations.instruments.update_rules import (CLIPPED_AFTER_NORM, clip_factors, decay_factors, optimizer_steps,
                                                update_source, with_decay)
from ablations.instruments.block_scalars import drop_inactive


class ParamOptions(Options):
    # Weight and applied-update norms: off leaves weight_norm, update_norm and update_ratio NaN.
    updates: bool = True
    # Where the update comes from. `copy`: the weights after the step minus a copy taken before it (what the
    # stored float32 weights really changed by; a model's worth of memory on captured steps). `slots`: the
    # step Keras computed, read from the optimizer (plain SGD: lr times the clipped gradient; SGD with
    # momentum: its velocity; Adam/AdamW and RMSprop: their moments; weight decay included), no copy; it equals
    # `copy` up to float32 rounding of the weights (they differ only where an update is below the weights'
    # resolution). `auto`: `slots` where the optimizer allows it exactly (update_rules.py), else `copy`.
    # The trade: `slots` saves a model's worth of memory but takes a few more element-wise passes over the
    # optimizer's state (Adam/AdamW/RMSprop), so on a CPU-bound run `copy` can be cheaper in time (README).
    update_source: Literal["auto", "copy", "slots"] = "auto"


class ParamNorms(Instrument):
    """L2 norms of every trainable tensor's gradient, weight (before the update) and applied update."""

    name = "param_norms"
    table = "params"
    order = 10
    Opts = ParamOptions
    columns = (
        Column("grad_norm", "L2 norm of the tensor's global-batch gradient", "grad_norm/{layer}/{param}"),
        Column("weight_norm", "L2 norm of the tensor before the update"),
        Column("update_norm", "L2 norm of the change the optimizer applied"),
    )
    derived = (
        ("params", Column("update_ratio", "update_norm / weight_norm (NaN for an all-zero tensor)",
                          "update_ratio/{layer}/{param}")),
        ("history", Column("grad_decay_rate", "least-squares slope of log10(block kernel-gradient norm) over "
                                              "block depth, decades per block (positive: shrinks toward the input)")),
    )
    summary_keys = ("ratio_init", "ratio_final", "decay_rate_init", "decay_rate_final")

    @property
    def needs(self) -> frozenset:  # type: ignore[override]
        return frozenset({"grads", "pre_update_weights"} if self.options.updates else {"grads"})

    def needs_for(self, optimizer: Any) -> frozenset:
        """What this step needs: no pre-update copy when the update can be read from the optimizer."""
        if self.options.updates and update_source(optimizer, self.options.update_source) != "copy":
            return frozenset({"grads"})
        return self.needs

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        grads = ctx.grad_norms(red)
        self._update, self._scale = None, None  # set by after_update (measure(): no update, update_norm NaN)
        self._source = update_source(ctx.model.optimizer, self.options.update_source) if self.options.updates \
            else None
        weights = None
        if self._source == "copy":
            weights = red.norms(ctx.old_weights)
        elif self._source is not None:
            # Before the update, and finished before it (ctx.before_update): the reads need no copy.
            sq = sq_sums(ctx.variables)
            ctx.before_update.append(sq)
            weights = red.sums(sq)  # identical on every replica: divided back below
            self._lr = tf.cast(ctx.model.optimizer.learning_rate, tf.float32)  # the rate this step applies
        # Plain SGD without weight decay: the update norm is lr times the clipped gradient norm, no tensor pass.
        self._sgd_norms = self._source == "sgd" and not getattr(ctx.model.optimizer, "weight_decay", None)
        n_rep = num_replicas()
        source = self._source

        def finish(r: Any) -> dict[str, Any]:
            out = {"grad_norm": (None, r(grads))}
            if weights is not None:
                out["weight_norm"] = (None, r(weights) if source == "copy" else tf.sqrt(r(weights) / n_rep))
            if source is not None and (self._update is not None or self._sgd_norms):
                out["update_norm"] = (None, self._update_norms(r, r(grads), ctx.model.optimizer))
            return out

        return finish

    def after_update(self, ctx: StepContext, red: Reducer) -> None:
        self._update, self._scale = None, None
        if self._source == "copy" and ctx.old_weights is not None:
            # Subtract in the variable's dtype, then cast: casting first would round float64 weights to float32
            # and swamp a small update with the rounding error of the weights.
            deltas = [tf.cast(v, o.dtype) - o for v, o in zip(ctx.variables, ctx.old_weights)]
            self._update = red.norms(deltas, skip=ctx.param_skip())
        elif self._source is not None:
            if self._sgd_norms:
                return None  # lr times the clipped gradient norm: no pass over the tensors (_update_norms)
            opt = ctx.model.optimizer
            decay = decay_factors(opt, ctx.variables, self._lr)
            steps = optimizer_steps(self._source, opt, ctx.variables, ctx.global_grads, self._lr)
            tensors, self._scale = steps.q, steps.scale  # |sign| = 1: the norms need no sign
            if any(c is not None for c in decay):  # the decay mixes into each entry (update_rules.with_decay)
                tensors, self._scale = with_decay(steps, decay, ctx.variables)
            self._update = red.norms(tensors, skip=ctx.param_skip())
        return None

    def _update_norms(self, r: Any, grad_norms: Any, optimizer: Any) -> Any:
        """The applied update's norm per tensor, from the copy or the optimizer's own step (update_rules.py)."""
        if self._sgd_norms:  # plain SGD: lr times the gradient's norm, clipped as Keras clips
            return self._lr * grad_norms * clip_factors(optimizer, grad_norms)
        norms = r(self._update)
        if self._scale is not None:  # a scalar, or per tensor (weight decay)
            norms = self._scale * norms
        if self._source in CLIPPED_AFTER_NORM:  # 1 without norm clipping (always so with weight decay)
            norms = norms * clip_factors(optimizer, grad_norms)
        return norms

    @classmethod
    def derive(cls, tables: dict[str, pd.DataFrame]) -> None:
        p = tables["params"]
        with np.errstate(divide="ignore", invalid="ignore"):
            # Undefined for an all-zero tensor (biases at init): NaN, not inf.
            p["update_ratio"] = (p["update_norm"] / p["weight_norm"]).where(p["weight_norm"] > 0)
        h = tables["history"]
        rates = decay_rates(drop_inactive(p, tables.get("blocks")))
        h["grad_decay_rate"] = h["step"].map(rates).astype(float)

    @classmethod
    def summarize(cls, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
        return gradient_summary(tables["params"], tables.get("blocks"), tables.get("history"))


    @classmethod
    def tensorboard(cls, tables: dict[str, pd.DataFrame], events: Any) -> None:
        """``block_kernels/log10_grad_norm``: the spread of block kernel-gradient norms across depth per step."""
        from tensorboard.plugins.histogram.summary import histogram_pb

        k = block_kernels(tables.get("params", pd.DataFrame()))
        for step, g in (k.groupby("step") if not k.empty else []):
            v = g["grad_norm"].to_numpy(dtype=float)
            v = v[np.isfinite(v) & (v > 0)]
            if len(v):
                events.add(step, histogram_pb("block_kernels/log10_grad_norm", np.log10(v)))


# ------------------------------------------------------------------------------ the per-block series


def block_kernels(params: pd.DataFrame) -> pd.DataFrame:
    """Rows of each block's first linear kernel, or its recurrent layer's input kernel (the per-block
    weight-gradient series).

    Zoo rows are found by their names (``block_<i>_linear``/``block_<i>_rnn``, param ``kernel``); rows of
    models whose blocks were found otherwise carry a ``block_kernel`` flag (:func:`ablations.probe.spec.
    block_kernel_rows`). Tables of several arms may mix both (the flag is NaN for zoo arms).
    """
    if params.empty:
        return params
    zoo = ((params["role"] == "block") & (params["param"] == "kernel")
           & ((params["layer"] == params["block"] + "_linear") | (params["layer"] == params["block"] + "_rnn")))
    if "block_kernel" in params:
        flag = params["block_kernel"]
        zoo = flag.where(flag.notna(), zoo).astype(bool) & (params["role"] == "block")
    return params[zoo]


def decay_rates(params: pd.DataFrame) -> pd.Series:
    """Gradient-decay rate per captured step (index: step), NaN where fewer than 2 finite blocks."""
    k = block_kernels(params)
    if k.empty:
        return pd.Series(dtype=float)
    k = k[np.isfinite(k["grad_norm"]) & (k["grad_norm"] > 0)]
    out = {}
    for step, g in k.groupby("step"):
        if g["depth"].nunique() < 2:
            out[step] = math.nan
            continue
        slope = np.polyfit(g["depth"].to_numpy(float), np.log10(g["grad_norm"].to_numpy(float)), 1)[0]
        out[step] = float(slope)  # positive: the gradient shrinks toward the input (block 0)
    return pd.Series(out, dtype=float).sort_index()


def first_last_ratio(params: pd.DataFrame, step: int, depths: tuple[int, int] | None = None) -> float:
    """Kernel gradient norm of the first block divided by that of the last block at ``step`` (NaN if n/a).

    ``depths``: the model's first and last block; when either is missing at ``step`` (switched off, see
    :func:`~ablations.instruments.block_scalars.drop_inactive`) the ratio is undefined, not that of others.
    """
    k = block_kernels(params)
    k = k[k["step"] == step].sort_values("depth")
    if len(k) < 2 or (depths is not None and (k["depth"].iloc[0], k["depth"].iloc[-1]) != depths):
        return math.nan
    first, last = float(k["grad_norm"].iloc[0]), float(k["grad_norm"].iloc[-1])
    return first / last if last > 0 else math.nan


def gradient_summary(params: pd.DataFrame, blocks: pd.DataFrame | None = None,
                     history: pd.DataFrame | None = None) -> dict[str, Any]:
    """First/last-block gradient ratios and decay rates at the first and last captured steps (switched-off
    blocks left out). The decay rates are read from ``history.grad_decay_rate`` when it is given."""
    k = block_kernels(params)
    depths = (int(k["depth"].min()), int(k["depth"].max())) if not k.empty else None
    steps = np.sort(params["step"].unique())  # the captured steps, switched-off blocks or not
    params = drop_inactive(params, blocks)
    if params.empty:
        return {"ratio_init": math.nan, "ratio_final": math.nan, "decay_rate_init": math.nan,
                "decay_rate_final": math.nan}
    if history is not None and "grad_decay_rate" in history and len(history):
        rates = history.set_index("step")["grad_decay_rate"].dropna().sort_index()
    else:
        rates = decay_rates(params)
    return {"ratio_init": first_last_ratio(params, int(steps[0]), depths),
            "ratio_final": first_last_ratio(params, int(steps[-1]), depths),
            "decay_rate_init": float(rates.iloc[0]) if len(rates) else math.nan,
            "decay_rate_final": float(rates.iloc[-1]) if len(rates) else math.nan}
