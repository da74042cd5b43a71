"""``ablate report``: a self-contained static HTML report (Jinja2, autoescaped) of Seaborn figures.

``build_report(run_dir, out)`` writes ``out/index.html`` (overview table, figures grouped by section, the
config), one drill-down page per arm under ``out/arms/<arm>/index.html``, and every figure as PNG plus the
plotted data as CSV. Several run folders give a side-by-side comparison (an extra ``run`` axis shown as
facet columns, shared y axes). The pages load nothing from the network and open from disk.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape

from ablations.config import short_keys
from ablations.report.data import RunData, load_run, merge_runs
from ablations.store import StoreError
from ablations.ui import fmt


MISSING = "–"  # a missing value in the report's tables (an en dash; the terminal's tables use "-")


def _num(x: Any, spec: str = ".3g") -> str:
    return fmt(x, spec, MISSING)


def _ci(c: dict[str, Any] | None, spec: str = ".3g") -> str:
    """``mean ± half-width`` of a :func:`ablations.report.stats.mean_ci` dict."""
    if not c or c.get("mean") is None:
        return MISSING
    return _num(c["mean"], spec) + (f" ± {_num(c['half'], '.2g')}" if c.get("half") is not None else "")


def _fixes(v: dict[str, Any]) -> str:
    """A verdict's fixes as tooltip lines (``try: what (source) [config keys]``)."""
    from ablations.diagnose import fix_text

    return "".join(f"\ntry: {fix_text(f)}" for f in v.get("fixes") or [])


def _cell(v: Any) -> Any:
    """A cell of a search's trial table: floats to 4 significant digits, anything else as it is."""
    return _num(v, ".4g") if isinstance(v, float) else v


def environment() -> Environment:
    """The Jinja environment of every report page (run, arm and search pages): autoescaped, with the
    filters ``num`` (a number), ``ci`` (mean ± half-width), ``cell`` (a trial-table cell) and ``fixes`` (a
    verdict's fixes as tooltip lines)."""
    env = Environment(loader=PackageLoader("ablations.report", "templates"),
                      autoescape=select_autoescape(["html"], default=True))
    env.filters.update(num=_num, ci=_ci, cell=_cell, fixes=_fixes)
    return env


def _slugs(arm_ids: list[str]) -> dict[str, str]:
    """Folder names for arm pages: the arm id with URL-unsafe characters replaced, made unique."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for a in arm_ids:
        s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", a).strip("._") or "arm"
        base, i = s, 2
        while s in used:
            s, i = f"{base}_{i}", i + 1
        used.add(s)
        out[a] = s
    return out


def _default_out(run: RunData) -> Path:
    if len(run.sources) > 1:
        names = (re.sub(r"[^A-Za-z0-9._-]+", "_", p.name) for p in run.sources)
        return Path("reports") / ("compare_" + "_vs_".join(names))
    return Path("reports") / run.name


def build_report(run_dir: Path | Sequence[Path], out: Path | None = None, workers: int | None = None,
                 on_note: Callable[[str], None] | None = None) -> Path:
    """Renders the report of one run folder, or the comparison of several, into ``out``.

    Args:
        run_dir: a run folder (``runs/<experiment>``) or a list of them (compared side by side).
        out: report folder (default ``reports/<experiment>``, or ``reports/compare_<a>_vs_<b>``).
        workers: drawing processes (default: one per core from 12 arms on, see
            :func:`ablations.report.render.default_workers`).
        on_note: called with one line per arm the page leaves out (damaged, or not of the current
            experiment), so a terminal says so too and not only the page.

    Returns:
        The path of ``index.html``.
    """
    from ablations.report.arm import arm_views
    from ablations.report.plotting import plan_for
    from ablations.report.render import draw_all
    from ablations.report.stats import arm_rows, point_rows

    t0 = time.time()
    dirs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(d) for d in run_dir]
    if not dirs:
        raise ValueError("build_report needs at least one run folder")
    run = merge_runs([load_run(d) for d in dirs])
    _tell_left_out(run, on_note or (lambda line: None))
    out = Path(out) if out else _default_out(run)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot write the report to {out}: {err.strerror}; choose another --out") from None
    plan = plan_for(run)
    slugs = _slugs([s["arm_id"] for s in run.summaries])
    pages = {a: f"arms/{quote(s)}/index.html" for a, s in slugs.items()}
    rows = arm_rows(run, plan.labels, pages)
    views = arm_views(run, plan)
    folders = [out / "arms" / slugs[v.arm_id] for v in views]
    figures, per_arm, problems = draw_all(run, plan, out, views, folders, workers)
    env = environment()
    arm_tpl = env.get_template("arm.html")
    for i, (view, row, folder, (figs, arm_problems)) in enumerate(zip(views, rows, folders, per_arm)):
        problems.extend(f"{view.arm_id}: {p}" for p in arm_problems)
        prev_row, next_row = (rows[i - 1] if i else None), (rows[i + 1] if i + 1 < len(rows) else None)
        (folder / "index.html").write_text(arm_tpl.render(
            name=run.name, row=row, summary=view.summary, figures=figs, error=view.error, problems=arm_problems,
            config=_arm_yaml(run, view.arm_id), prev=prev_row, next=next_row, home="../../index.html",
            up="../../"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    sections = list(dict.fromkeys(f.section for f in figures))
    page = env.get_template("index.html").render(
        run=run, name=run.name, description=run.experiment.get("description", ""), rows=rows,
        points=point_rows(run, rows), figures=figures, sections=sections, axes=run.axes, counts=counts,
        problems=run.notes + problems, damaged=run.damaged, others=run.others, sources=run.sources, plan=plan,
        render_s=time.time() - t0, home="index.html", up="",
        tensorboard=[d for d in dirs if next(d.glob("arms/*/tb"), None)], axis_names=short_keys(run.axes))
    index = out / "index.html"
    index.write_text(page)
    return index


def _tell_left_out(run: RunData, on_note: Callable[[str], None]) -> None:
    """One line per damaged arm, one for the arm folders of other experiments (the page lists them too)."""
    for arm_id, what in run.damaged.items():
        on_note(f"damaged arm left out: {arm_id}: {'; '.join(what)} (`ablate run` retrains it)")
    if run.others:
        on_note(f"{len(run.others)} arm folder(s) not of the current experiment, listed apart: "
                + ", ".join(sorted(run.others)[:5]) + (" ..." if len(run.others) > 5 else ""))


def _arm_yaml(run: RunData, arm_id: str) -> str:
    import yaml

    cfg = run.arm_config(arm_id)
    return yaml.safe_dump(cfg, sort_keys=False) if cfg else ""


__all__ = ["build_report", "load_run", "merge_runs"]
