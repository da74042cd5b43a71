"""The "Reproductions" page of ``ablate reproduce``: one row per claim with its figure beside it.

``build_reproductions(results, out)`` writes ``out/index.html`` (Jinja2, autoescaped, opens from disk),
``out/results.json`` and, per claim, ``out/<claim>.png`` with the plotted data as ``out/<claim>.csv``. Every
figure is drawn from the claim's stored tables (the report never touches a live model), by the claim's
``figure:`` spec: ``depth`` (a column against block depth at one step), ``curve`` (against step or epoch),
``time`` (||dL/dh_t|| against t) or ``values`` (the measured values as bars).
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ablations.report.plotting import Figure, save

FIGSIZE = (4.6, 3.0)


def _label(arm: Any) -> str:
    """An arm's legend label: its id without the axis names (and without ``seed=0``)."""
    parts = [p.split("=", 1)[-1] if not p.startswith("seed=") else p for p in arm.id.split(",")]
    return ", ".join(p for p in parts if p != "seed=0") or arm.id


def _profile_rows(result: Any, src: Any) -> pd.DataFrame:
    """Long data of a depth / curve / time figure: one row per (arm, x) with the plotted y."""
    from ablations.claims import _filter, _ordered

    fig = result.claim.figure
    x = {"depth": "depth", "time": "t"}.get(fig.kind) or ("epoch" if fig.table == "epochs" else "step")
    rows = []
    for arm in src.match(fig.arms):
        df = src.table(arm, fig.table)
        filters = {"step": fig.step} if fig.kind in ("depth", "time") else {}
        df = _ordered(_filter(df, arm, fig.table, filters))
        if fig.kind == "depth":
            df = df[df["depth"] >= 0]
        g = df.groupby(x, sort=True)[fig.column].mean()
        if fig.relative and len(g):
            g = g / g.iloc[-1]
        rows.append(pd.DataFrame({"arm": _label(arm), "arm_id": arm.id, x: g.index, fig.column: g.to_numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _values_rows(result: Any) -> pd.DataFrame:
    names = result.claim.show or list(result.claim.measure)
    rows = []
    for n in names:
        if n not in result.values:
            continue
        a = np.asarray(result.values[n])
        if a.dtype == object or a.dtype == bool:
            continue
        for i, v in enumerate(a.astype(float).reshape(-1)):
            rows.append({"measure": n, "element": i, "value": float(v)})
    return pd.DataFrame(rows)


def _refs(result: Any, src: Any) -> dict[str, float]:
    from ablations.claims import evaluate

    out = {}
    parsed = result.claim.compile()
    for key, expr in parsed.items():
        if key.startswith("figure.ref."):
            try:
                v = np.asarray(evaluate(expr, src, result.values), dtype=float).reshape(-1)
                out[key.split(".", 2)[2]] = float(v[0])
            except Exception:  # a reference line that cannot be computed is left out, never breaks the page
                continue
    return out


def draw(result: Any, out: Path) -> Optional[Figure]:
    """The claim's figure (PNG + CSV) in ``out``, or None when there is nothing to draw."""
    import matplotlib.pyplot as plt

    fig_spec = result.claim.figure
    src = None
    if result.run_dir is not None and result.claim.kind != "theory":
        from ablations.reproduce import source

        src = source(result.experiment, result.run_dir)
    data = _profile_rows(result, src) if fig_spec.kind != "values" and src is not None else _values_rows(result)
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if "measure" in data.columns:
        _bars(ax, data, fig_spec.logy)
    else:
        x = [c for c in data.columns if c not in ("arm", "arm_id", fig_spec.column)][0]
        for arm, g in data.groupby("arm", sort=False):
            ax.plot(g[x], g[fig_spec.column], marker="." if len(g) < 40 else None, label=arm)
        ax.set_xlabel(x)
        ax.set_ylabel(f"{fig_spec.table}.{fig_spec.column}" + (f" / value at last {x}" if fig_spec.relative else ""))
        positive = (data[fig_spec.column] > 0).all()
        if fig_spec.logy and positive:
            ax.set_yscale("log")
    for i, (label, y) in enumerate(_refs(result, src).items()):
        if math.isfinite(y) and (ax.get_yscale() != "log" or y > 0):
            ax.axhline(y, color="0.3", ls=["--", ":", "-."][i % 3], lw=1, label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best", frameon=False)
    ax.tick_params(labelsize=7)
    ax.xaxis.label.set_size(8)
    ax.yaxis.label.set_size(8)
    ax.set_title(result.name, fontsize=9)  # on the axes: save()'s suptitle sits too high for a small figure
    return save(fig, out, result.name, data, "", _caption(result), section="Reproductions")


def _bars(ax: Any, data: pd.DataFrame, logy: bool) -> None:
    means = data.groupby("measure", sort=False)["value"].mean()
    ax.bar(range(len(means)), means.to_numpy(), color="#4c72b0")
    ax.set_xticks(range(len(means)), means.index, rotation=30, ha="right", fontsize=7)
    v = means.to_numpy()
    if logy and (v > 0).all() and v.max() / max(v.min(), 1e-300) > 100:
        ax.set_yscale("log")


def _caption(result: Any) -> str:
    fig = result.claim.figure
    if fig.kind == "depth":
        return f"{fig.table}.{fig.column} against block depth at step {fig.step}, one line per arm."
    if fig.kind == "curve":
        return f"{fig.table}.{fig.column} over training, one line per arm."
    if fig.kind == "time":
        return f"||dL/dh_t|| against t at step {fig.step}, one line per arm."
    return "The measured values (mean over elements)."


def _machine() -> str:
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.node()}: {platform.machine()}, {cpus} CPU(s), load {load:.1f}, Python {platform.python_version()}"


def build_reproductions(results: Sequence[Any], out: Path, seconds: float | None = None) -> Path:
    """Writes the Reproductions page of ``results`` into ``out``; returns the path of ``index.html``."""
    from ablations.report import environment
    from ablations.report.figures import theme
    from ablations.reproduce import HOLDS, NOT_HOLD, NOT_RUN, write_results

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    theme()
    rows, problems = [], []
    for r in results:
        try:
            figure = draw(r, out)
        except Exception as err:  # one broken figure must not cost the page
            figure, _ = None, problems.append(f"{r.name}: figure failed: {type(err).__name__}: {err}")
        rows.append({"r": r, "c": r.claim, "figure": figure, "cls": r.status.replace(" ", "-")})
    write_results(results, out)
    counts = {s: sum(r.status == s for r in results) for s in (HOLDS, NOT_HOLD, NOT_RUN)}
    page = environment().get_template("reproductions.html").render(
        rows=rows, counts=counts, problems=problems, when=time.strftime("%Y-%m-%d %H:%M"), machine=_machine(),
        seconds=seconds, home="index.html", up="")
    index = out / "index.html"
    index.write_text(page)
    return index
