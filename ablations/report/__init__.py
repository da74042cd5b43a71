"""``ablate report``: a static HTML page (Jinja2, autoescaped) of Seaborn figures from a run folder."""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from ablations.report.data import RunData, load_run


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _env() -> Environment:
    env = Environment(loader=PackageLoader("ablations.report", "templates"),
                      autoescape=select_autoescape(["html"], default=True))
    env.filters["num"] = _fmt
    return env


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    """Renders the report of ``run_dir`` into ``out`` (default ``reports/<experiment>``).

    Returns:
        The path of ``index.html``.
    """
    from ablations.report.figures import make_figures

    t0 = time.time()
    run = load_run(Path(run_dir))
    out = Path(out) if out else Path("reports") / run.name
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(run, out)
    rows = [_row(s) for s in run.summaries]
    page = _env().get_template("index.html").render(
        run=run, name=run.name, description=run.experiment.get("description", ""), rows=rows,
        figures=figures, axes=run.axes, counts=_counts(run), render_s=time.time() - t0)
    index = out / "index.html"
    index.write_text(page)
    return index


def _counts(run: RunData) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in run.summaries:
        out[s.get("status", "?")] = out.get(s.get("status", "?"), 0) + 1
    return out


def _row(s: dict[str, Any]) -> dict[str, Any]:
    f = s.get("final") or {}
    note = s.get("error") or (f"diverged at step {s['diverged_at_step']}" if s.get("status") == "diverged" else "")
    return {"arm": s["arm_id"], "status": s.get("status", "?"), "loss": f.get("loss"),
            "accuracy": f.get("accuracy"), "val_loss": f.get("val_loss"), "val_accuracy": f.get("val_accuracy"),
            "ratio_init": s.get("ratio_init"), "ratio_final": s.get("ratio_final"),
            "time": s.get("wall_time_s"), "note": note}


__all__ = ["build_report", "load_run"]
