"""Synthetic arm tables over the real structure of every zoo family, for the verdict matrix (test_verdicts.py).

Each family's model is built small and measured once (:func:`ablations.probe.measure_tables`: step-0 tables
shaped exactly like stored ones, pre_layer and scalar columns included); :func:`synth` then repeats those
rows over many steps and writes values that do or do not show each pathology. Every table also carries the
family's own pattern that once caused false verdicts (issue #17), in every scenario:

* ReZero (``rezero_mlp``, ``rezero_cnn``, ``transformer/rezero``): ``alpha`` exactly 0 at step 0, so every
  branch tensor has exactly zero gradient and update there (alpha's own gradient is not 0);
* stochastic depth in batch mode: ``active`` is 0 or 1 per (step, block), drawn with the model's own
  survival probabilities (p_L = 0.3: the last block is off 70% of the steps, so without the switched-off
  rule its median gradient and update would be 0); a switched-off block's tensors get exactly zero gradient
  and update (the probe's zeros, or NaN placeholders as older stores have them: ``placeholder="nan"``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import keras
import numpy as np
import pandas as pd

import zoo
from ablations.probe import measure_tables
from harness import MODELS

WINDOW = 200  # diagnose.window's default; the tests pass it explicitly
STEPS_PER_EPOCH = 23  # digits at batch 64
# name: (steps, capture every, first step of the judged regime): shorter than the window (the run's halves
# are compared for the loss) and longer (600 steps captured every 2nd: the last 200 steps are judged; what
# happens before step 200 only reaches the loss rule's "window before" from step 200 on).
LENGTHS = {"short": (50, 1, 0), "long": (600, 2, 200),
           "init": (50, 1, 10)}  # for the at-init check: `before` covers the first 10 steps
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# The harness's small models, with ReZero at its real init (alpha 0) and stochastic depth dropping often.
OVERRIDES = {"rezero_mlp": {"alpha_init": 0.0}, "rezero_cnn": {"alpha_init": 0.0},
             "stochastic_depth_mlp": {"survival_prob": 0.3}, "stochastic_depth_cnn": {"survival_prob": 0.3}}
FAMILIES: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    **{name: (MODELS[name][0], {**MODELS[name][1], **OVERRIDES.get(name, {})}) for name in zoo.names()},
    "transformer/rezero": (MODELS["transformer"][0], {**MODELS["transformer"][1], "residual": "rezero"}),
}
# Columns left NaN when a capture switch is off (checked against measure_tables in test_verdicts.py).
NOT_CAPTURED = {"params": ("params", ["grad_norm", "weight_norm", "update_norm", "update_ratio"]),
                "updates": ("params", ["weight_norm", "update_norm", "update_ratio"]),
                "activations": ("blocks", ["act_grad_norm", "act_mean", "act_std", "act_saturation", "act_dead"])}


@dataclasses.dataclass(frozen=True)
class Values:
    """What the tables show at a step: block 0's pathologies, and how the loss moves."""

    ratio: float = 1.0  # first/last block kernel-gradient ratio (geometric over depth)
    update: float = 1e-2  # block 0's update/weight ratio (the other blocks: 1e-2)
    sat: float = 0.2  # block 0's saturated share (the others: 0.2)
    dead: float = 0.0  # block 0's dead-unit share (the others: ~0.01)
    loss_factor: float = 0.7  # mean loss of a judged window over that of the window before


HEALTHY = Values()


@dataclasses.dataclass(frozen=True)
class Template:
    """A family's step-0 tables and the scalars its blocks have."""

    params: pd.DataFrame
    blocks: pd.DataFrame
    history: pd.DataFrame
    survival: np.ndarray | None  # per block row: stochastic depth's p_l
    rezero: bool


@functools.lru_cache(maxsize=None)
def template(family: str) -> Template:
    """Builds ``family`` small and measures one batch: the real tables' rows and columns."""
    shape, opts = FAMILIES[family]
    keras.utils.set_random_seed(0)
    net = zoo.build(family.split("/")[0], input_shape=shape, num_outputs=10, **opts)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(8, *shape)).astype(np.float32), np.arange(8) % 10
    t = measure_tables(net, batch, LOSS, training=True)
    layers = {layer.name: layer for layer in net.layers}
    probs = [getattr(layers.get(f"{b}_stochastic_depth"), "survival_prob", None) for b in t["blocks"]["block"]]
    survival = np.array(probs, float) if any(p is not None for p in probs) else None
    rezero = bool(t["blocks"]["alpha"].notna().any())
    return Template(t["params"], t["blocks"], t["history"], survival, rezero)


def _tile(df: pd.DataFrame, steps: np.ndarray) -> pd.DataFrame:
    out = df.iloc[np.tile(np.arange(len(df)), len(steps))].reset_index(drop=True)
    out["step"] = np.repeat(steps, len(df)).astype(np.int64)
    out["epoch"] = out["step"] // STEPS_PER_EPOCH
    return out


def _per_row(plan: pd.DataFrame, field: str, step: np.ndarray) -> np.ndarray:
    return plan[field].reindex(step).to_numpy(float)


def synth(family: str, length: str, judged: Values, before: Values = HEALTHY, *, seed: int = 0,
          placeholder: str = "zeros", diverge: str | None = None, diverge_at: int | None = None
          ) -> dict[str, pd.DataFrame]:
    """Tables of ``family`` over a run of ``length`` (see :data:`LENGTHS`).

    Args:
        judged: the values from the judged regime's first step on (the whole run when short).
        before: the values before it (long runs).
        placeholder: what switched-off blocks' tensors hold: ``zeros`` (the probe) or ``nan`` (older stores).
        diverge: ``loss`` (NaN loss) or ``grad`` (Inf global gradient norm, finite loss, as fused ReLU
            kernels give) at ``diverge_at`` (default :func:`diverge_step`); the tables end there, as a
            diverged arm's do.
    """
    n, every, start = LENGTHS[length]
    steps = np.arange(0, n, every)
    if diverge:
        steps = steps[steps <= (diverge_step(length) if diverge_at is None else diverge_at)]
    regime = steps >= start
    plan = pd.DataFrame({f.name: np.where(regime, getattr(judged, f.name), getattr(before, f.name))
                         for f in dataclasses.fields(Values)}, index=steps)
    rng = np.random.default_rng(seed)
    t = template(family)
    blocks = _blocks(t, steps, plan, rng)
    params = _params(t, steps, plan, blocks, rng, placeholder)
    history = _history(t, steps, plan, length, rng)
    if diverge:
        last = steps[-1]
        col = "loss" if diverge == "loss" else "global_grad_norm"
        history.loc[history["step"] == last, col] = np.nan if diverge == "loss" else np.inf
        params.loc[params["step"] == last, ["grad_norm", "update_norm", "update_ratio"]] = np.nan
    return {"params": params, "blocks": blocks, "history": history}


def diverge_step(length: str) -> int:
    """The step at which a diverging run of ``length`` turns non-finite (inside the judged regime)."""
    return {"short": 30, "long": 450, "init": 30}[length]


def _blocks(t: Template, steps: np.ndarray, plan: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    b = _tile(t.blocks, steps)
    step, depth = b["step"].to_numpy(), b["depth"].to_numpy()
    for col, field, healthy, spread in (("act_saturation", "sat", 0.2, 0.05), ("act_dead", "dead", 0.0, 0.02)):
        measured = np.isfinite(b[col].to_numpy(float))  # recurrent blocks have no activation statistics
        value = np.where(depth == 0, _per_row(plan, field, step), healthy) + rng.uniform(0, spread, len(b))
        b[col] = np.where(measured, np.clip(value, 0.0, 1.0), np.nan)
    if t.rezero:  # exactly 0 at init; it moves from the first update on
        b["alpha"] = np.where(step == 0, 0.0, 0.01 * np.sqrt(step))
    if t.survival is not None:  # batch mode: the whole branch is on or off, per (step, block)
        p = np.tile(t.survival, len(steps))
        b["active"] = (rng.random(len(b)) < p).astype(float)
    return b


def _params(t: Template, steps: np.ndarray, plan: pd.DataFrame, blocks: pd.DataFrame, rng: np.random.Generator,
            placeholder: str) -> pd.DataFrame:
    p = _tile(t.params, steps)
    step, depth = p["step"].to_numpy(), p["depth"].to_numpy()
    block = (p["role"] == "block").to_numpy()
    last = int(t.blocks["depth"].max())
    frac = (last - depth) / max(last, 1)  # 1 at block 0, 0 at the last block
    noise = rng.lognormal(0.0, 0.2, (2, len(p)))
    p["grad_norm"] = np.where(block, _per_row(plan, "ratio", step) ** frac, 1.0) * noise[0]
    w0 = p["weight_norm"].to_numpy(float)
    weight = np.where(w0 > 0, w0, np.where(step == 0, 0.0, 0.05))  # biases start at 0
    ratio = np.where(block & (depth == 0), _per_row(plan, "update", step), 1e-2) * noise[1]
    p["weight_norm"], p["update_norm"] = weight, ratio * weight
    # The branch of a switched-off block gets no gradient and no update by design (alpha itself does).
    off = pd.MultiIndex.from_frame(p[["step", "depth"]]).isin(pd.MultiIndex.from_frame(_off_pairs(blocks)))
    off &= block & (p["param"] != "alpha").to_numpy()
    p.loc[off, ["grad_norm", "update_norm"]] = 0.0 if placeholder == "zeros" else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        p["update_ratio"] = (p["update_norm"] / p["weight_norm"]).where(p["weight_norm"] > 0)
    return p


def _off_pairs(blocks: pd.DataFrame) -> pd.DataFrame:
    alpha = blocks["alpha"].to_numpy(float)
    active = blocks["active"].to_numpy(float)
    return blocks.loc[(alpha == 0) | (active == 0), ["step", "depth"]]


def _history(t: Template, steps: np.ndarray, plan: pd.DataFrame, length: str, rng: np.random.Generator) -> pd.DataFrame:
    n, every, _ = LENGTHS[length]
    window = WINDOW if n >= 2 * WINDOW else n // 2  # what the loss rule compares: windows, or the run's halves
    # Geometric within each regime: the mean of every window is loss_factor times the one before.
    step_log = np.log(plan["loss_factor"].to_numpy(float)) * every / window
    loss = 2.3 * np.exp(np.concatenate([[0.0], np.cumsum(step_log[1:])])) * rng.lognormal(0, 0.002, len(steps))
    h = pd.DataFrame({"step": steps.astype(np.int64), "epoch": steps // STEPS_PER_EPOCH, "loss": loss,
                      "global_grad_norm": rng.lognormal(0, 0.2, len(steps)), "lr": 0.01, "grad_decay_rate": np.nan})
    return h[list(t.history.columns)]


def not_captured(tables: dict[str, pd.DataFrame], switch: str) -> dict[str, pd.DataFrame]:
    """``tables`` as stored with ``capture.<switch>: false``: its columns NaN."""
    table, cols = NOT_CAPTURED[switch]
    out = dict(tables)
    out[table] = tables[table].assign(**{c: np.nan for c in cols})
    return out
