"""Verdicts: plain-language diagnoses of gradient flow, computed from the stored tables (no TensorFlow).

Each verdict names the blocks and the evidence, e.g. ``"blocks 0-11: update ratio 2e-05..4e-04 < 1e-3 over
the last 200 steps"``. Thresholds (all overridable under ``diagnose:`` in the YAML):

* vanishing: first/last block kernel-gradient ratio < 1e-3 (AUTOTRAINER, Zhang et al. 2021), or a block's
  gradient norm below an absolute floor of 1e-8 (also when every block's is 0 and no ratio exists);
* exploding: first/last ratio > 70 (AUTOTRAINER) or a non-finite loss or global gradient norm;
* stalled: update/weight ratio < 1e-3 (the seed's rule: below it a layer is barely learning);
* saturated: more than 80% of a block's activation entries have a derivative < 5% of the maximum
  (Glorot & Bengio 2010's saturated sigmoid units; our threshold);
* dead units: more than 40% of a block's units have zero derivative for the whole batch (our threshold);
* plateau: the mean training loss of the last window changed by less than 1% (either way) from the window
  before;
* rising_loss: it rose by more than that instead (a rising loss is not a plateau);
* edge_of_stability (opt-in ``curvature`` instrument): the median, over the captures of the judged window,
  of the sharpness divided by the optimizer's stability bound is at least 0.9 (2/lr for plain SGD,
  (2 + 2 momentum)/lr with heavy-ball momentum: Cohen et al. 2021; for Adam the preconditioned sharpness
  against (2 + 2 beta_1)/((1 - beta_1) lr): Cohen et al. 2022; never for optimizers without a bound).

The gradient-decay rate is the least-squares slope of log10(block kernel gradient norm) against block depth:
decades per block, positive when the gradient shrinks toward the input (vanishing), negative when it grows
toward the input (exploding); one number that ranks architectures.

Every verdict carries ``fixes``: what to try, why, and the source (:data:`FIXES`), filtered by what is known
of the model (:func:`fixes_for`; e.g. no "use ReLU" for a ReLU net, no "add skips" for a residual one) and,
for zoo models, given as config keys (``model.activation: relu``). ``ablate diagnose --try-fixes`` applies
the ones marked in :data:`TRYABLE` to an outside model and measures them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ablations.config import DiagnoseConfig  # the one source of the thresholds' defaults
from ablations.instruments.block_scalars import drop_inactive
from ablations.instruments.param_norms import (block_kernels, decay_rates, first_last_ratio,  # noqa: F401
                                               gradient_summary)

DEFAULTS: dict[str, float] = DiagnoseConfig().model_dump()


def block_ranges(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"blocks 0-2, 5"``."""
    blocks = sorted(set(int(b) for b in blocks))
    if not blocks:
        return "no blocks"
    parts, start, prev = [], blocks[0], blocks[0]
    for b in blocks[1:] + [None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return ("block " if len(blocks) == 1 else "blocks ") + ", ".join(parts)


def _window(df: pd.DataFrame, window: int, at_init: bool) -> tuple[pd.DataFrame, str]:
    steps = np.sort(df["step"].unique())
    if at_init:
        chosen = steps[: max(1, min(len(steps), 5))]
        label = f"over the first {len(chosen)} captured step{'s' * (len(chosen) > 1)}"
    else:
        last = steps[-1]
        chosen = steps[steps > last - window]
        n = int(last - chosen[0] + 1)
        label = f"over the last {n} step{'s' * (n > 1)}"
    return df[df["step"].isin(chosen)], label


def _verdict(kind: str, blocks: list[int], message: str) -> dict[str, Any]:
    """One verdict (its ``fixes`` are attached by :func:`verdicts`)."""
    return {"kind": kind, "blocks": sorted(int(b) for b in blocks), "message": message}


def verdicts(params: pd.DataFrame, blocks: pd.DataFrame, history: pd.DataFrame,
             thresholds: dict[str, float] | None = None, at_init: bool = False,
             facts: dict[str, Any] | None = None, curvature: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Diagnoses an arm from its tables.

    Args:
        params, blocks, history: the arm's tables (as stored).
        thresholds: overrides of :data:`DEFAULTS`.
        at_init: judge the first captured steps only (used to prune searches early).
        facts: what is known of the model and optimizer (:func:`ablations.probe.facts.model_facts`), to pick
            the fixes that apply; None: every fix of the kind.
        curvature: the arm's ``curvature`` table (the opt-in instrument), for ``edge_of_stability``.

    Returns:
        A list of ``{"kind", "blocks", "message", "fixes"}``; empty when nothing is wrong.
    """
    th = {**DEFAULTS, **(thresholds or {})}
    out: list[dict[str, Any]] = []
    k = block_kernels(drop_inactive(params, blocks))  # switched-off blocks are left out, not NaN
    bad = _non_finite(k, history, int(th["window"]), at_init)
    if bad is not None:
        out.append(bad)
    if not k.empty:
        win, label = _window(k, int(th["window"]), at_init)
        if bad is None:
            out.extend(_flow(win, label, th))
        out.extend(_stalled(win, label, th))
    if blocks is not None and not blocks.empty:
        out.extend(_activations(blocks, th, at_init))
    if not at_init and history is not None and len(history) >= 4:
        out.extend(_plateau(history, th))
    if not at_init and curvature is not None and not curvature.empty:
        out.extend(_edge_of_stability(curvature, th))
    for v in out:
        v["fixes"] = fixes_for(v["kind"], facts)
    return out


def _non_finite(k: pd.DataFrame, history: pd.DataFrame, window: int, at_init: bool) -> dict[str, Any] | None:
    """``exploding`` when the loss or the global gradient norm turned NaN/Inf (at init: in the first steps).

    Judged on ``history``, whose columns are always measured: a NaN in a per-block column can also mean
    "not captured" (``capture.params: false``) or "switched off by design", which is no evidence of anything.
    """
    if history is None or history.empty:  # tables without a history (hand-made): the per-block norms
        g = k["grad_norm"].astype(float) if not k.empty else pd.Series(dtype=float)
        if np.isfinite(g).all() or g.isna().all():  # all NaN: not captured (capture.params false)
            return None
        win, label = _window(k, window, at_init)
        bad = sorted(win.loc[~np.isfinite(win["grad_norm"].astype(float)), "depth"].unique())
        return _verdict("exploding", bad, f"non-finite gradients {label}") if bad else None
    h = _window(history, window, at_init)[0] if at_init else history
    cols = [c for c in ("loss", "global_grad_norm") if c in h]
    values = h[cols].to_numpy(dtype=float)
    if not cols or np.isfinite(values).all():
        return None
    first = int(h["step"].to_numpy()[~np.isfinite(values).all(axis=1)].min())
    blocks: list[int] = []
    if not k.empty:
        g = k.loc[k["step"] == first, ["depth", "grad_norm"]]
        if g["grad_norm"].notna().any():  # captured: name the blocks whose gradient is NaN/Inf there
            blocks = sorted(g.loc[~np.isfinite(g["grad_norm"].astype(float)), "depth"].unique())
    return _verdict("exploding", blocks, f"non-finite gradients or loss from step {first}")


def _flow(win: pd.DataFrame, label: str, th: dict[str, float]) -> list[dict[str, Any]]:
    """``vanishing`` / ``exploding`` from the window's median kernel-gradient norm per block: the first/last
    ratio, and the absolute floor (judged even when the last block's gradient is 0 too: an all-zero
    gradient is the deepest vanishing, not a missing one)."""
    med = win.groupby("depth")["grad_norm"].median().sort_index()
    finite = med[np.isfinite(med)]
    if finite.empty:
        return []
    last_depth, last = int(finite.index[-1]), float(finite.iloc[-1])
    rel = finite / last if len(finite) >= 2 and last > 0 else pd.Series(dtype=float)
    ratio = float(rel.iloc[0]) if len(rel) else float("nan")
    weak = [int(d) for d, r in rel.items() if r < th["vanishing_ratio"]]
    floor = [int(d) for d, g in finite.items() if g < th["vanishing_floor"]]
    if ratio < th["vanishing_ratio"] or floor:
        return [_verdict("vanishing", sorted(set(weak) | set(floor)),
                         _vanishing_message(weak, finite[[d for d in floor if d not in weak]], ratio, last_depth,
                                            label, th))]
    if ratio > th["exploding_ratio"]:
        strong = [d for d, r in rel.items() if r > th["exploding_ratio"]]
        return [_verdict("exploding", strong, f"{block_ranges(strong)} receive > {th['exploding_ratio']:g}x the "
                                              f"gradient of block {last_depth} (first/last ratio "
                                              f"{ratio:.1e}) {label}")]
    return []


def _vanishing_message(weak: list[int], floored: pd.Series, ratio: float, last_depth: int, label: str,
                       th: dict[str, float]) -> str:
    """The ratio clause for blocks far below the last block; the floor clause for the others below the floor
    (a block whose ratio is fine is not said to receive < 1e-3 of the last block's gradient)."""
    parts = []
    if weak:
        parts.append(f"{block_ranges(weak)} receive < {th['vanishing_ratio']:g} of the gradient of block "
                     f"{last_depth} (first/last ratio {ratio:.1e})")
    if len(floored):
        parts.append(f"{block_ranges(floored.index)}: gradient norm {floored.min():.1e}..{floored.max():.1e} < "
                     f"{th['vanishing_floor']:g}")
    return "; ".join(parts) + f" {label}"


# "Barely learning" is a claim about training, not about one update: the first step of a run with a small
# learning rate (or Adam's bias-corrected first step) can sit below the stall ratio in a net that trains.
STALL_MIN_STEPS = 3


def _stalled(win: pd.DataFrame, label: str, th: dict[str, float]) -> list[dict[str, Any]]:
    if "update_ratio" not in win or not np.isfinite(win["update_ratio"]).any():
        return []
    if win["step"].nunique() < STALL_MIN_STEPS:
        return []
    ur = win.groupby("depth")["update_ratio"].median()
    stalled = ur[ur < th["stall_ratio"]]
    if not len(stalled):
        return []
    return [_verdict("stalled", list(stalled.index), f"{block_ranges(stalled.index)}: update ratio "
                                                     f"{stalled.min():.0e}..{stalled.max():.0e} < "
                                                     f"{th['stall_ratio']:g} {label}")]


def _activations(blocks: pd.DataFrame, th: dict[str, float], at_init: bool) -> list[dict[str, Any]]:
    win, label = _window(blocks, int(th["window"]), at_init)
    out = []
    for col, kind, key, what in [("act_saturation", "saturated", "saturated_fraction", "saturated entries"),
                                 ("act_dead", "dead_units", "dead_fraction", "dead units")]:
        if col not in win or not np.isfinite(win[col]).any():
            continue
        med = win.groupby("depth")[col].median()
        hit = med[med > th[key]]
        if len(hit):
            out.append(_verdict(kind, list(hit.index), f"{block_ranges(hit.index)}: {hit.min():.0%}..{hit.max():.0%} "
                                                       f"{what} (> {th[key]:.0%}) {label}"))
    return out


def _plateau(history: pd.DataFrame, th: dict[str, float]) -> list[dict[str, Any]]:
    """``plateau`` when the last window's mean loss changed by less than 1% either way over the window before;
    ``rising_loss`` when it rose by more (a rising loss is no plateau)."""
    h = history[np.isfinite(history["loss"])].sort_values("step")
    if len(h) < 4:
        return []
    last = h["step"].iloc[-1]
    w = int(th["window"])
    if last - h["step"].iloc[0] + 1 < 2 * w:  # short run: compare its halves
        w = max(1, int((last - h["step"].iloc[0] + 1) // 2))
    recent = h[h["step"] > last - w]["loss"].mean()
    before = h[(h["step"] <= last - w) & (h["step"] > last - 2 * w)]["loss"].mean()
    if not (np.isfinite(recent) and np.isfinite(before)) or before <= 0:
        return []
    gain = (before - recent) / before
    span = f"training loss {before:.3g} -> {recent:.3g} over the last {w} steps"
    # Symmetric: a change smaller than the threshold either way is a plateau (a flat loss's noise must not
    # flip it to rising_loss); a rise beyond it is a rising loss.
    if gain < -th["plateau_improvement"]:
        return [_verdict("rising_loss", [], f"{span}: it rose by {-gain:.1%}")]
    if gain < th["plateau_improvement"]:
        return [_verdict("plateau", [], f"{span}: {-gain:+.1%} (less than {th['plateau_improvement']:.0%} "
                                        f"improvement)")]
    return []


def _edge_of_stability(curv: pd.DataFrame, th: dict[str, float]) -> list[dict[str, Any]]:
    """``edge_of_stability`` when the window's median of ``edge_ratio`` (the bounded sharpness over the
    optimizer's stability bound, NaN where there is no bound) reaches ``th["edge_ratio"]``."""
    c = curv[np.isfinite(curv["edge_ratio"].to_numpy(float))].sort_values("step")
    if c.empty:
        return []
    last = c["step"].iloc[-1]
    win = c[c["step"] > last - int(th["window"])]
    ratio = float(np.median(win["edge_ratio"]))
    if ratio < th["edge_ratio"]:
        return []
    pre = np.isfinite(win["preconditioned_sharpness"].to_numpy(float)).all()
    what = "preconditioned sharpness lambda_max(P^-1 H)" if pre else "sharpness (top Hessian eigenvalue)"
    value = float(np.median(win["preconditioned_sharpness" if pre else "sharpness"]))
    bound = float(np.median(win["stability_bound"]))
    span = f"{len(win)} captured step{'s' * (len(win) > 1)} over the last {int(last - win['step'].iloc[0] + 1)} steps"
    return [_verdict("edge_of_stability", [], f"{what} {value:.3g} is {ratio:.2f} of the stability bound "
                     f"{bound:.3g} (median of {span}): training runs at the edge of stability (Cohen et al. 2021)")]


# ---------------------------------------------------------------------------------------------- fixes

SATURATING = ("sigmoid", "tanh", "hard_sigmoid", "softsign", "hard_tanh", "log_sigmoid")
RESIDUAL_ARCH = {"plain_mlp": "resnet_mlp", "plain_cnn": "resnet_cnn", "densenet_mlp": "resnet_mlp",
                 "densenet_cnn": "resnet_cnn", "simple_rnn": "lstm"}
TRYABLE = ("activation", "initializer", "clipping", "learning_rate")  # what --try-fixes can apply by cloning

# kind of verdict -> (fix kind, what to try, why, source, config keys, Keras spelling); "{lr/10}" and the like
# are filled from the optimizer's rate.
FIXES: dict[str, list[tuple[str, str, str, str, dict[str, Any], str]]] = {
    "vanishing": [
        ("activation", "a ReLU-family activation (ReLU, Leaky ReLU, GELU) instead of sigmoid/tanh",
         "sigmoid' <= 0.25 and tanh' < 1 away from 0 shrink the gradient at every layer; ReLU' is 1 where active",
         "Glorot & Bengio 2010; He et al. 2015", {"model.activation": "relu"}, "activation='relu'"),
        ("initializer", "He (Kaiming) initialization, or LSUV (unit output variance per layer, from data)",
         "keeps the variance of activations and gradients the same from layer to layer",
         "He et al. 2015; Mishkin & Matas 2016", {"model.initializer": "he_normal"}, "kernel_initializer='he_normal'"),
        ("skip", "identity skip connections (a residual network)",
         "the identity path carries the gradient to the first layers undiminished", "He et al. 2016",
         {"model.arch": "{residual}"}, "x = x + block(x)"),
        ("normalization", "batch or layer normalization before each activation",
         "keeps pre-activations out of the saturated range and rescales each layer's gradient",
         "Ioffe & Szegedy 2015; Ba et al. 2016", {"model.norm": "batch"}, "keras.layers.BatchNormalization()"),
    ],
    "exploding": [
        ("clipping", "gradient clipping by global norm",
         "caps the step when the gradient norm spikes and keeps its direction", "Pascanu et al. 2013",
         {"train.optimizer.global_clipnorm": 1.0}, "optimizer(global_clipnorm=1.0)"),
        ("learning_rate", "a smaller learning rate ({lr/10})",
         "the update grows with the rate; past about 2/curvature it diverges", "LeCun et al. 1998; Bengio 2012",
         {"train.optimizer.learning_rate": "{lr/10}"}, "optimizer(learning_rate={lr/10})"),
        ("warmup", "learning-rate warm-up over the first few hundred steps",
         "the large early gradients meet a small rate while the weights settle", "Goyal et al. 2017",
         {"train.optimizer.schedule.warmup_steps": 200}, "a LearningRateSchedule that ramps up linearly"),
    ],
    "saturated": [
        ("activation", "a non-saturating activation (ReLU family)",
         "a saturated unit passes almost no gradient (sigmoid' < 5% of its maximum there)",
         "Glorot & Bengio 2010; He et al. 2015", {"model.activation": "relu"}, "activation='relu'"),
        ("initializer", "Glorot (Xavier) initialization, which keeps pre-activations in the linear range",
         "too large initial weights drive sigmoid/tanh units to their flat tails", "Glorot & Bengio 2010",
         {"model.initializer": "glorot_uniform"}, "kernel_initializer='glorot_uniform'"),
        ("normalization", "batch or layer normalization before each activation",
         "re-centres and rescales the pre-activations every step", "Ioffe & Szegedy 2015",
         {"model.norm": "batch"}, "keras.layers.BatchNormalization()"),
    ],
    "dead_units": [
        ("activation", "Leaky ReLU, ELU or GELU, whose negative side still passes a gradient",
         "a ReLU unit whose input is negative for every example never recovers", "Maas et al. 2013; Clevert et al. 2016",
         {"model.activation": "leaky_relu"}, "activation='leaky_relu'"),
        ("initializer", "He initialization with zero biases",
         "large negative biases or badly scaled weights start units dead", "He et al. 2015; Lu et al. 2019",
         {"model.initializer": "he_normal", "model.bias_init_std": 0.0}, "kernel_initializer='he_normal'"),
        ("learning_rate", "a smaller learning rate ({lr/10})",
         "one large update can push a unit's input negative for every example", "Lu et al. 2019",
         {"train.optimizer.learning_rate": "{lr/10}"}, "optimizer(learning_rate={lr/10})"),
    ],
    "stalled": [
        ("learning_rate", "a larger learning rate ({lr*10}), or Adam (per-parameter step sizes)",
         "update/weight ratios far below 1e-3 mean the weights barely move", "Kingma & Ba 2015",
         {"train.optimizer.learning_rate": "{lr*10}"}, "optimizer(learning_rate={lr*10})"),
        ("normalization", "batch or layer normalization",
         "makes the step size of each layer independent of its weight scale", "Ioffe & Szegedy 2015",
         {"model.norm": "batch"}, "keras.layers.BatchNormalization()"),
    ],
    "plateau": [
        ("schedule", "a learning-rate schedule (step decay or cosine)",
         "a smaller rate late in training resolves finer structure of the loss",
         "He et al. 2016; Loshchilov & Hutter 2017", {"train.optimizer.schedule": "cosine"},
         "keras.optimizers.schedules.CosineDecay"),
        ("optimizer", "momentum (0.9) or Adam", "accumulated steps cross flat regions faster",
         "Sutskever et al. 2013; Kingma & Ba 2015", {"train.optimizer.momentum": 0.9}, "SGD(momentum=0.9)"),
    ],
    "edge_of_stability": [
        ("learning_rate", "a smaller learning rate ({lr/10}), if the loss oscillates or spikes",
         "above the bound a step overshoots along the top Hessian eigenvector; gradient descent then hovers "
         "at the bound with a non-monotone loss instead of diverging", "Cohen et al. 2021",
         {"train.optimizer.learning_rate": "{lr/10}"}, "optimizer(learning_rate={lr/10})"),
        ("warmup", "learning-rate warm-up", "lets the sharpness fall before the full rate applies",
         "Gilmer et al. 2022", {"train.optimizer.schedule.warmup_steps": 200},
         "a LearningRateSchedule that ramps up linearly"),
    ],
    "rising_loss": [
        ("learning_rate", "a smaller learning rate ({lr/10})", "the steps overshoot the minimum",
         "LeCun et al. 1998; Bengio 2012", {"train.optimizer.learning_rate": "{lr/10}"},
         "optimizer(learning_rate={lr/10})"),
        ("clipping", "gradient clipping by global norm", "caps the occasional huge step", "Pascanu et al. 2013",
         {"train.optimizer.global_clipnorm": 1.0}, "optimizer(global_clipnorm=1.0)"),
        ("warmup", "learning-rate warm-up", "early steps are the most unstable", "Goyal et al. 2017",
         {"train.optimizer.schedule.warmup_steps": 200}, "a LearningRateSchedule that ramps up linearly"),
    ],
}


def _applies(fix: str, verdict: str, f: dict[str, Any]) -> bool:
    """Whether a fix can still help, given what is known of the model (unknown facts: it may)."""
    acts, inits = set(f.get("activations") or ()), set(f.get("initializers") or ())
    opt = f.get("optimizer") or {}
    if fix == "activation":
        want = {"relu"} if verdict == "dead_units" else set(SATURATING)
        return not acts or bool(acts & want)
    if fix == "initializer":
        ok = ("glorot",) if verdict == "saturated" else ("he_", "lsuv", "variance_scaling")
        return not inits or not all(any(i.startswith(p) for p in ok) for i in inits)
    if fix == "skip":
        return not f.get("residual") and ((f.get("zoo") or {}).get("arch") in RESIDUAL_ARCH or not f.get("zoo"))
    checks = {"normalization": not f.get("normalization"), "clipping": not opt.get("clipping"),
              "warmup": not opt.get("warmup"), "schedule": not opt.get("schedule"),
              "optimizer": not (opt.get("momentum") or opt.get("name") in ("adam", "adamw", "rmsprop"))}
    return checks.get(fix, True)


def _fill(value: Any, f: dict[str, Any]) -> Any:
    """``{lr/10}``, ``{lr*10}`` and ``{residual}`` placeholders from the facts (kept as words when unknown)."""
    if not isinstance(value, str) or "{" not in value:
        return value
    lr = (f.get("optimizer") or {}).get("learning_rate")
    arch = (f.get("zoo") or {}).get("arch")
    for key, new in (("{lr/10}", lr / 10 if lr else None), ("{lr*10}", lr * 10 if lr else None),
                     ("{residual}", RESIDUAL_ARCH.get(arch))):
        if key in value:
            if new is None:
                return value.replace(key, {"{residual}": "a residual model"}.get(key, "rate / 10" if "/" in key
                                                                                 else "rate x 10"))
            if value == key:
                return float(f"{new:.3g}") if isinstance(new, float) else new
            value = value.replace(key, f"{new:.3g}" if isinstance(new, float) else str(new))
    return value


def fixes_for(kind: str, facts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The fixes to try for a verdict ``kind``: ``{kind, what, why, source, config, keras, tryable}``.

    ``config`` (zoo models only, else empty) holds the YAML keys that apply the fix; ``keras`` says it in Keras
    terms for an outside model; ``tryable``: ``ablate diagnose --try-fixes`` can apply it by cloning.
    """
    f = facts or {}
    out = []
    for fix, what, why, source, config, keras_how in FIXES.get(kind, []):
        if not _applies(fix, kind, f):
            continue
        out.append({"kind": fix, "what": _fill(what, f), "why": why, "source": source,
                    "config": {k: _fill(v, f) for k, v in config.items()} if f.get("zoo") else {},
                    "keras": _fill(keras_how, f), "tryable": fix in TRYABLE})
    return out


def fix_text(fix: dict[str, Any]) -> str:
    """One line for a terminal or a tooltip: ``what (source) [key: value, ...]``."""
    keys = ", ".join(f"{k}: {v}" for k, v in (fix.get("config") or {}).items())
    return f"{fix['what']} ({fix['source']})" + (f" [{keys}]" if keys else "")
