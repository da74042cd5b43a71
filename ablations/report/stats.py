"""Numbers for the report's tables: per-arm rows, and grid points aggregated over seeds with 95% CIs."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ablations.report.data import RunData

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def arm_decay(run: RunData) -> pd.DataFrame:
    """Decay rate of every arm at its first (``decay_init``) and last (``decay_end``) captured step.

    Read from the summaries (``decay_rate_init/final``, computed once by the ``param_norms`` instrument from
    ``history.grad_decay_rate``, switched-off blocks left out), never recomputed here.
    """
    rows = [{"arm_id": s["arm_id"], "decay_init": _num(s.get("decay_rate_init")), "decay_end": _num(s.get("decay_rate_final"))}
            for s in run.summaries]
    return pd.DataFrame(rows, columns=["arm_id", "decay_init", "decay_end"])


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def mean_ci(values: Iterable[Any], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean and Student-t confidence interval over the finite values (seeds); None where undefined."""
    v = np.array([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "half": None, "n": 0}
    m = float(v.mean())
    if len(v) < 2:
        return {"mean": m, "lo": None, "hi": None, "half": None, "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": m, "lo": m - half, "hi": m + half, "half": half, "n": int(len(v))}


def _note(s: dict[str, Any]) -> str:
    if s.get("status") == "diverged":
        return f"diverged at step {s.get('diverged_at_step')}"
    return s.get("error") or ""


def arm_rows(run: RunData, labels: dict[str, str], pages: dict[str, str]) -> list[dict[str, Any]]:
    """One row per arm (seed): status, final metrics, decay rates, verdicts, note, link to its page."""
    decay = arm_decay(run).set_index("arm_id")
    rows = []
    for s in run.summaries:
        f = s.get("final") or {}
        arm = s["arm_id"]
        rows.append({
            "arm": arm, "label": labels.get(arm, ""), "seed": s.get("seed"), "status": s.get("status", "?"),
            "page": pages.get(arm), **{m: f.get(m) for m in METRICS},
            "decay_init": decay["decay_init"].get(arm) if arm in decay.index else None,
            "decay_end": decay["decay_end"].get(arm) if arm in decay.index else None,
            "ratio_init": s.get("ratio_init"), "ratio_final": s.get("ratio_final"),
            "verdicts": list(s.get("verdicts") or []), "time": s.get("wall_time_s"), "note": _note(s),
            "capture_cost": (s.get("capture_cost") or {}).get("run_over_plain")})
    return rows


def point_rows(run: RunData, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Arms that differ only in their seed, aggregated: mean and 95% CI of metrics and decay rates."""
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for s, r in zip(run.summaries, rows):
        groups.setdefault(json.dumps(s.get("values") or {}, sort_keys=True, default=str), []).append((s, r))
    out = []
    for members in groups.values():
        s0, r0 = members[0]
        arms = [r for _, r in members]
        statuses: dict[str, int] = {}
        for r in arms:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        verdicts: dict[str, list[str]] = {}
        fixes: dict[str, list[dict[str, Any]]] = {}  # the fixes of the kind's first verdict (seeds share a model)
        for r in arms:
            for v in r["verdicts"]:
                verdicts.setdefault(v.get("kind", "?"), []).append(f"seed {r['seed']}: {v.get('message', '')}")
                fixes.setdefault(v.get("kind", "?"), list(v.get("fixes") or []))
        out.append({
            "values": s0.get("values") or {}, "label": _point_label(s0.get("values") or {}),
            "axis_values": [_value(s0.get("values", {}).get(a)) for a in run.axes],
            "statuses": statuses, "worst": _worst(statuses),
            "seeds": [(r["seed"], r["page"], r["status"]) for r in arms],
            **{m: mean_ci(r[m] for r in arms) for m in (*METRICS, "decay_init", "decay_end")},
            "verdicts": [{"kind": k, "count": len(v), "messages": v, "fixes": fixes[k]} for k, v in verdicts.items()],
            "n": len(arms)})
    return out


def _worst(statuses: dict[str, int]) -> str:
    for s in ("failed", "diverged", "completed"):
        if s in statuses:
            return s
    return next(iter(statuses), "?")


def _point_label(values: dict[str, Any]) -> str:
    from ablations.config import short_keys, value_label

    names = short_keys(list(values))
    return ", ".join(f"{names[k]}={value_label(v)}" for k, v in values.items()) or "(no grid)"


def _value(v: Any) -> str:
    from ablations.report.plotting import value_text

    return value_text(v)
