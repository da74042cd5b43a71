"""Shared plotting machinery: how arms map onto colours and facets, seed bands, saving PNG + CSV.

Layout rule (every run-level figure follows it, so arms look the same everywhere):

* the x axis is the block's depth position, the step or the epoch;
* a grid axis named ``*.depth`` (the network depth) becomes the facet **rows**, since networks of different
  depth have different x ranges;
* the other varying axes combine into the **hue** (one colour per grid point, in sweep order); when that
  would give more than :data:`MAX_HUES` colours, the axis with the fewest values moves to the facet
  **columns** (in a comparison of runs, the ``run`` axis always does: runs side by side, same y axis), and
  if there is no depth axis and colours still run out, the next fewest-valued axis takes the **rows**;
* seeds are aggregated: the line is the mean over seeds (geometric mean on log axes) and the band spans
  the lowest to the highest seed. Aggregates are computed with one pandas ``groupby`` rather than
  Seaborn's per-point bootstrap, which kept a 50-arm report from rendering in under a minute.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure as MplFigure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from ablations.config import short_keys  # noqa: E402
from ablations.report.data import RUN_AXIS, TABLES, RunData  # noqa: E402

PALETTE = "colorblind"  # colour-blind-safe (seaborn's 10-colour variant of Wong 2011 / Okabe-Ito)
SEQUENTIAL = "viridis"  # perceptually uniform and colour-blind-safe, for heatmaps and "step" colours
MAX_HUES = 6  # more lines than this per panel stop being readable
ROW_LABEL = "row"  # label column of a non-depth axis shown as facet rows
DPI = 90
DASHES = ["-", "--", ":", "-."]
WHENS = ["init", "middle", "end"]
BAND_NOTE = "line: mean over seeds (geometric mean on log axes); band: lowest to highest seed"
BLOCK_AXIS = "block (0 = nearest the input)"
STALL_RATIO = 1e-3  # update/weight ratio below which a layer is barely learning (LITERATURE.md 15)
SNAPSHOTS = 5  # profiles drawn per arm figure, at evenly spaced captured steps


@dataclasses.dataclass
class Figure:
    """A written figure: file names relative to the report folder, title, caption and page section."""

    key: str
    title: str
    png: str
    csv: str
    caption: str
    section: str = "Gradient flow"


@dataclasses.dataclass
class Plot:
    """A drawn figure that is not written yet: what a figure function returns to the registry.

    ``fig`` is a matplotlib figure or a seaborn grid; ``data`` is what goes into the CSV.
    """

    fig: Any
    data: pd.DataFrame
    title: str
    caption: str
    margin_right: float = 0.2  # inches right of the panels, for per-arm figures (their fixed layout)


@dataclasses.dataclass
class Plan:
    """How arms map onto plot aesthetics (see the module docstring for the rule)."""

    hue: str  # column holding each arm's hue label ("arm")
    hue_order: list[str]
    palette: dict[str, Any]
    row: str | None  # column for facet rows: the network-depth axis, or ROW_LABEL (see plan_for)
    row_order: list[Any]
    col: str | None  # grid axis shown as facet columns, or None
    col_order: list[str]  # labels in column "col"
    labels: dict[str, str]  # arm_id -> hue label
    cols: dict[str, str]  # arm_id -> column label ("" without a column axis)
    short: dict[str, str]  # arm_id -> its values on every varying axis but seeds, without names (panel titles)
    rows: dict[str, Any]  # arm_id -> its value in column ``row`` (None without rows)
    hue_title: str = "arm"

    @property
    def row_is_depth(self) -> bool:
        return self.row is not None and self.row != ROW_LABEL


def value_text(v: Any) -> str:
    from ablations.config import value_label

    return "–" if v is None else value_label(v)


def _n_values(run: RunData, axis: str) -> int:
    return len({value_text(s.get("values", {}).get(axis)) for s in run.summaries})


def plan_for(run: RunData) -> Plan:
    """Chooses rows, columns and hue from the axes that vary; adds ``arm`` and ``col`` (and ``row`` when a
    non-depth axis takes the rows) label columns to every table of ``run`` (in place)."""
    axes = run.axes
    names = short_keys(axes)
    depth_axis = next((a for a in axes if a.endswith(".depth") or a == "depth"), None)
    others = [a for a in axes if a != depth_axis]
    col_axis = None
    if RUN_AXIS in others:
        col_axis = RUN_AXIS
    elif len(others) >= 2 and math.prod(_n_values(run, a) for a in others) > MAX_HUES:
        col_axis = min(reversed(others), key=lambda a: _n_values(run, a))
    hue_axes = [a for a in others if a != col_axis]
    row_axis = None  # without a depth axis, rows are free for a second axis when colours still run out
    if depth_axis is None and len(hue_axes) >= 2 and math.prod(_n_values(run, a) for a in hue_axes) > MAX_HUES:
        row_axis = min(reversed(hue_axes), key=lambda a: _n_values(run, a))
        hue_axes.remove(row_axis)

    def label(s: dict[str, Any], keys: list[str]) -> str:
        return " / ".join(f"{names[a]}={value_text(s.get('values', {}).get(a))}" for a in keys)

    labels = {s["arm_id"]: label(s, hue_axes) if hue_axes else "all arms" for s in run.summaries}
    cols = {s["arm_id"]: label(s, [col_axis]) if col_axis else "" for s in run.summaries}
    if depth_axis:
        rows = {s["arm_id"]: s["values"].get(depth_axis) for s in run.summaries}
        row_order = sorted({v for v in rows.values() if v is not None})
    else:
        rows = {s["arm_id"]: label(s, [row_axis]) if row_axis else None for s in run.summaries}
        row_order = list(dict.fromkeys(rows.values())) if row_axis else []
    for t in TABLES:
        df = run.table(t)
        if not df.empty:
            df["arm"] = df["arm_id"].map(labels)
            df["col"] = df["arm_id"].map(cols)
            if row_axis:
                df[ROW_LABEL] = df["arm_id"].map(rows)
    hue_order = list(dict.fromkeys(labels[s["arm_id"]] for s in run.summaries))
    colours = sns.color_palette(PALETTE, max(len(hue_order), 1))
    return Plan(hue="arm", hue_order=hue_order, palette=dict(zip(hue_order, colours)),
                row=depth_axis or (ROW_LABEL if row_axis else None), row_order=row_order, col=col_axis, rows=rows,
                col_order=list(dict.fromkeys(cols[s["arm_id"]] for s in run.summaries)) if col_axis else [],
                labels=labels, cols=cols,
                short={s["arm_id"]: " · ".join(value_text(s.get("values", {}).get(a)) for a in axes) or "all arms"
                       for s in run.summaries},
                hue_title=" / ".join(names[a] for a in hue_axes) or "arm")


# --------------------------------------------------------------------------------------------- data helpers


def finite(df: pd.DataFrame, col: str, positive: bool = False) -> pd.DataFrame:
    """Rows where ``col`` is finite (and > 0 when it goes on a log axis)."""
    if df.empty or col not in df:
        return df.iloc[0:0]
    ok = np.isfinite(df[col].to_numpy(float))
    if positive:
        ok &= df[col].to_numpy(float) > 0
    return df[ok]


def wants_log(values: Any) -> bool:
    """Log axis when positive data span more than two decades."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() > 100


def moments(df: pd.DataFrame) -> pd.DataFrame:
    """Keeps the first, middle and last captured step of each arm, labelled init / middle / end."""
    if df.empty:
        return df.assign(when=pd.Series(dtype=str))
    steps = df.groupby("arm_id")["step"].unique().map(np.sort)
    picks = {arm: {s[0]: "init", s[len(s) // 2]: "middle", s[-1]: "end"} for arm, s in steps.items() if len(s)}
    when = [picks[a].get(st) for a, st in zip(df["arm_id"], df["step"])]
    out = df.assign(when=when)
    out = out[out["when"].notna()]
    if (steps.map(len) < 3).any():  # a run with fewer than 3 captured steps: one step may carry 2 labels
        parts = [out]
        for arm, s in steps.items():
            if 0 < len(s) < 3:
                g = df[df["arm_id"] == arm]
                for w, st in (("init", s[0]), ("middle", s[len(s) // 2]), ("end", s[-1])):
                    if picks[arm].get(st) != w:
                        parts.append(g[g["step"] == st].assign(when=w))
        out = pd.concat(parts, ignore_index=True)
    return out


def downsample_steps(df: pd.DataFrame, max_points: int = 300) -> pd.DataFrame:
    """Bins steps so no arm has more than ``max_points`` x values (long runs stay light to draw)."""
    if df.empty:
        return df
    span = int(df["step"].max()) + 1
    width = max(1, math.ceil(span / max_points))
    if width == 1:
        return df
    return df.assign(step=(df["step"] // width) * width)


def with_panels(df: pd.DataFrame, plan: Plan, inner: str | None,
                inner_order: Sequence[str]) -> tuple[str | None, list[str]]:
    """Adds a ``panel`` column combining an inner facet (e.g. ``when``) with the plan's column axis."""
    if inner is None and plan.col is None:
        return None, []
    if plan.col is None:
        df["panel"] = df[inner].astype(str)
        return "panel", list(inner_order)
    if inner is None:
        df["panel"] = df["col"]
        return "panel", list(plan.col_order)
    df["panel"] = df[inner].astype(str) + " · " + df["col"]
    return "panel", [f"{i} · {c}" for c in plan.col_order for i in inner_order]


def band(df: pd.DataFrame, x: str, y: str, by: list[str], log: bool) -> pd.DataFrame:
    """Aggregates seeds: mean (geometric on log axes), min and max of ``y`` per line and x value."""
    by = [b for b in dict.fromkeys(by) if b is not None]
    v = np.log10(df[y].to_numpy(float)) if log else df[y].to_numpy(float)
    g = df.assign(_v=v).groupby(by + [x], sort=False, observed=True, dropna=False)["_v"]
    agg = g.agg(["mean", "min", "max", "count"]).reset_index()
    if log:
        for c in ("mean", "min", "max"):
            agg[c] = 10.0 ** agg[c]
    return agg.rename(columns={"mean": y, "min": f"{y}_lo", "max": f"{y}_hi", "count": "seeds"})


# --------------------------------------------------------------------------------------------- drawing


def _draw(data: pd.DataFrame, *, x: str, y: str, color: Any, style: str | None = None,
          style_order: Sequence[str] = (), marker: str | None = "o", **_: Any) -> None:
    ax = plt.gca()
    groups = data.groupby(style, sort=False) if style else [(None, data)]
    for key, d in groups:
        d = d.sort_values(x)
        ls = DASHES[list(style_order).index(key) % len(DASHES)] if style else "-"
        if (d["seeds"] > 1).any():
            ax.fill_between(d[x], d[f"{y}_lo"], d[f"{y}_hi"], color=color, alpha=0.2, lw=0)
        ax.plot(d[x], d[y], color=color, ls=ls, lw=1.6, marker=marker if len(d) <= 40 else None, ms=3.5)


class _Grid(sns.FacetGrid):
    """A FacetGrid without its automatic ``tight_layout`` passes.

    Seaborn re-lays out the figure when it is created and again after every ``map``; each pass measures
    every tick label of every panel, which made up half the drawing time of a 50-arm report. ``facet_lines``
    sets fixed gaps instead and ``save`` crops the margins.
    """

    def tight_layout(self, *args: Any, **kwargs: Any) -> "_Grid":
        return self


def facet_lines(agg: pd.DataFrame, plan: Plan, x: str, y: str, *, row: str | None = "plan", col: str | None = None,
                col_order: Sequence[Any] | None = None, log: bool = False, style: str | None = None,
                style_order: Sequence[str] = (), marker: str | None = "o", sharey: bool | str = True,
                height: float = 2.6, aspect: float = 1.35, extra_legend: dict[str, Any] | None = None) -> sns.FacetGrid:
    """One line (with its seed band) per hue label in a grid of panels; returns the FacetGrid."""
    row = plan.row if row == "plan" else row
    row_order = ((plan.row_order or None) if row == plan.row else plan.col_order if row == "col"
                 else sorted(agg[row].unique()) if row else None)
    hue_order = [h for h in plan.hue_order if h in set(agg[plan.hue])]
    g = _Grid(agg, row=row, col=col, hue=plan.hue, hue_order=hue_order, palette=plan.palette,
              row_order=row_order, col_order=list(col_order) if col_order else None, height=height,
              aspect=aspect, sharex=False, sharey=sharey, margin_titles=True, despine=True)
    g.map_dataframe(_draw, x=x, y=y, style=style, style_order=style_order, marker=marker)
    if log:
        g.set(yscale="log")
    if x in ("depth", "epoch", "lag"):  # whole blocks, epochs, time steps
        for ax in g.axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend = {h: Line2D([], [], color=plan.palette[h], lw=2) for h in hue_order}
    if style:
        legend.update({str(s): Line2D([], [], color="0.3", ls=DASHES[i % len(DASHES)])
                       for i, s in enumerate(style_order)})
    legend.update(extra_legend or {})
    # A figure legend right of the panels, kept in the PNG by save()'s tight bounding box. (FacetGrid.add_legend
    # draws the whole figure twice to resize it: a third of a 50-arm report's run-level drawing time.)
    g.figure.legend(list(legend.values()), list(legend), title=plan.hue_title, loc="center left",
                    bbox_to_anchor=(1.0, 0.5), frameon=False)
    g.set_titles(row_template="{row_name}" if row == ROW_LABEL else "{row_var} = {row_name}", col_template="{col_name}")
    # Fixed gaps in inches (room for tick labels; outer margins are cropped by save()'s tight bounding box).
    w = height * aspect
    g.figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.98, hspace=0.45 / (height - 0.45),
                             wspace=(0.2 if sharey is True else 0.75) / w)
    return g


def panels(g: sns.FacetGrid, data: pd.DataFrame, row: str | None, col: str | None):
    """Yields ``(ax, rows of data drawn in it)`` for every panel of a FacetGrid made with ``row``/``col``."""
    facets = [f for f in (row, col) if f]
    for key, ax in g.axes_dict.items():
        sel = data
        for f, v in zip(facets, key if isinstance(key, tuple) else (key,)):
            sel = sel[sel[f] == v]
        yield ax, sel


def baseline_lines(run: RunData, g: sns.FacetGrid, data: pd.DataFrame, row: str | None, col: str | None,
                   only: Any = None) -> dict[str, Any]:
    """Draws the trivial predictor's loss (``baseline_loss`` in an arm's summary, e.g. MSE 1/6 on the adding
    problem) as a dotted line in each panel whose arms share one; returns the legend entry (or nothing)."""
    base = {s["arm_id"]: s["baseline_loss"] for s in run.summaries
            if isinstance(s.get("baseline_loss"), (int, float))}
    if not base:
        return {}
    drawn = False
    for ax, sel in panels(g, data, row, col):
        if only is not None and not only(sel):
            continue
        values = {base[a] for a in sel["arm_id"].unique() if a in base}
        if len(values) == 1:
            ax.axhline(values.pop(), color="0.2", ls=":", lw=1.3)
            drawn = True
    return {"trivial predictor": Line2D([], [], color="0.2", ls=":", lw=1.3)} if drawn else {}


def _fewer_ticks(fig: Any, nbins: int | None) -> None:
    """Minor ticks of long log axes are unlabelled, yet cost much of the drawing time; ``nbins`` caps the
    major ticks of integer/MaxN axes too (every tick is a few artists)."""
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log" and lo > 0 and hi / lo > 1e3:
            ax.yaxis.set_minor_locator(NullLocator())
        if nbins is None:
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_locator(), MaxNLocator):
                axis.get_major_locator().set_params(nbins=nbins)


def save(fig: Any, out: Path, key: str, data: pd.DataFrame, title: str, caption: str = "",
         section: str = "Gradient flow", margin_right: float | None = None) -> Figure:
    """Writes ``<key>.png`` (with ``title`` on top) and the plotted data as ``<key>.csv`` into ``out``.

    Args:
        fig: a matplotlib figure or a seaborn grid.
        margin_right: None crops the PNG to its content (run-level and search figures). A number sets fixed
            margins instead, that many inches right of the panels: the per-arm figures, dozens per report,
            whose tight crop or layout engine would measure every tick label again and cost more than the
            drawing itself.
    """
    fig = fig.figure if hasattr(fig, "figure") else fig
    if margin_right is None:
        _fewer_ticks(fig, None)
        fig.suptitle(title, y=1 + 0.5 / fig.get_size_inches()[1], fontsize=12)  # 0.5 in above the panel titles
        fig.savefig(out / f"{key}.png", dpi=DPI, bbox_inches="tight")
    else:
        _fewer_ticks(fig, 5)
        w, h = fig.get_size_inches()
        fig.subplots_adjust(left=1.0 / w, right=1 - margin_right / w, bottom=0.6 / h, top=1 - 0.5 / h, wspace=0.5)
        fig.suptitle(title, fontsize=11)
        fig.savefig(out / f"{key}.png", dpi=DPI)
    plt.close(fig)
    data.to_csv(out / f"{key}.csv", index=False)
    return Figure(key=key, title=title, png=f"{key}.png", csv=f"{key}.csv", caption=caption, section=section)


def keep_cols(df: pd.DataFrame, plan: Plan, *cols: str) -> pd.DataFrame:
    """The columns worth putting in a CSV (ids, the facet columns, the plotted values)."""
    want = ["arm_id", "seed", "arm"] + ([plan.row] if plan.row else []) + ([plan.col] if plan.col else []) + list(cols)
    return df[[c for c in dict.fromkeys(want) if c in df.columns]]


# --------------------------------------------------------------------------------------------- figure helpers


def vs_depth(plan: Plan, data: pd.DataFrame, y: str, ylabel: str, title: str, caption: str,
             log: bool | None = None, hline: float | None = None,
             ylim: tuple[float, float] | None = None) -> Plot | None:
    """``y`` against block depth at the first, middle and last captured step (panels), seeds banded.

    ``log`` None chooses a log axis when the data span more than two decades; ``hline`` draws a dashed
    reference ratio; None when no finite (positive, on a log axis) value is left.
    """
    data = finite(data, y)
    log = wants_log(data[y]) if log is None else log
    data = finite(data, y, positive=True) if log else data
    if data.empty:
        return None
    data = moments(data)
    col, col_order = with_panels(data, plan, "when", WHENS)
    agg = band(data, "depth", y, [plan.hue, plan.row, col], log)
    extra = None
    if hline is not None:
        extra = {f"ratio {hline:.0e}".replace("e-0", "e-"): Line2D([], [], color="0.35", ls="--", lw=1)}
    g = facet_lines(agg, plan, "depth", y, col=col, col_order=col_order, log=log, extra_legend=extra)
    for ax in g.axes.flat:
        if hline is not None:
            ax.axhline(hline, color="0.35", ls="--", lw=1)
        if ylim is not None:
            ax.set_ylim(*ylim)
    g.set_axis_labels(BLOCK_AXIS, ylabel)
    return Plot(g, keep_cols(data, plan, "when", "step", "depth", y), title, caption + " " + BAND_NOTE + ".")


def add_legend_entries(g: Any, entries: dict[str, Any]) -> None:
    """Appends entries (e.g. the trivial-predictor line) to the figure legend made by facet_lines."""
    if not entries or not g.figure.legends:
        return
    old = g.figure.legends[-1]
    handles = old.legend_handles + list(entries.values())
    labels = [t.get_text() for t in old.get_texts()] + list(entries)
    title = old.get_title().get_text()
    old.remove()
    g.figure.legend(handles, labels, title=title, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


# Per-arm figures: plain matplotlib, one arm's data. Snapshots of a profile (e.g. gradient vs depth at several
# steps) are coloured by step with a sequential colour-blind-safe map (viridis: dark = early, yellow = late).


def subplots(nrows: int, ncols: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[MplFigure, Any]:
    """Like ``plt.subplots`` without pyplot's figure manager (less work per figure)."""
    fig = MplFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def snapshots(df: pd.DataFrame) -> list[int]:
    """Up to :data:`SNAPSHOTS` evenly spaced captured steps of ``df``, first and last included."""
    steps = np.sort(df["step"].unique())
    idx = np.unique(np.linspace(0, len(steps) - 1, min(SNAPSHOTS, len(steps))).round().astype(int))
    return [int(steps[i]) for i in idx]


def profiles(ax: Any, df: pd.DataFrame, y: str, steps: list[int], log: bool) -> None:
    """One line of ``y`` against depth per step of ``steps``, coloured from dark (early) to yellow (late)."""
    cmap = plt.get_cmap(SEQUENTIAL)
    for i, st in enumerate(steps):
        d = df[df["step"] == st].sort_values("depth")
        ax.plot(d["depth"], d[y], marker="o", ms=3, lw=1.5, color=cmap(i / max(1, len(steps) - 1) * 0.9),
                label=f"step {st}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(BLOCK_AXIS)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def depth_mesh(ax: Any, fig: Any, c: pd.DataFrame, label: str, xlabel: str, last_width: float, **kw: Any) -> None:
    """A block-by-x colour mesh of ``c`` (index: depth, columns: x), each cell spanning to the next column."""
    xs, depths = c.columns.to_numpy(), c.index.to_numpy()
    xe = np.append(xs, xs[-1] + (xs[-1] - xs[-2] if len(xs) > 1 else last_width))
    ye = np.append(depths, depths[-1] + 1) - 0.5
    mesh = ax.pcolormesh(xe, ye, c.to_numpy(), cmap=SEQUENTIAL, shading="flat", **kw)
    fig.colorbar(mesh, ax=ax, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("block")
    ax.yaxis.get_major_locator().set_params(integer=True)
