"""Draws all figures of a report, in parallel worker processes when there are many arms.

Drawing (matplotlib text layout and PNG encoding) dominates a report's time and is single-threaded, so a
50-arm report only fits in a minute on 2 cores with both cores drawing. Workers are forked, or come from a
``forkserver`` when TensorFlow is loaded (``ablate run`` writes the report after training), see
:func:`_context`. The run's tables are sent to each worker once (pool initializer); each task names one
run-level figure (its key in :mod:`ablations.report.figures`) or one arm.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ablations.report import figures
from ablations.report.arm import ArmView
from ablations.report.data import RunData
from ablations.report.plotting import Figure, Plan

PARALLEL_FROM_ARMS = 12  # below this, starting workers costs more than it saves
_STATE: dict[str, Any] = {}


def default_workers(n_arms: int) -> int:
    """Worker processes for a report of ``n_arms`` arms ($GRADZOO_REPORT_WORKERS overrides)."""
    env = os.environ.get("GRADZOO_REPORT_WORKERS")
    if env:
        return max(1, int(env))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 8) if n_arms >= PARALLEL_FROM_ARMS else 1


def _context() -> mp.context.BaseContext:
    """``fork`` when TensorFlow is not loaded (cheapest, nothing to re-import); otherwise a ``forkserver``,
    since forking a process whose TensorFlow runtime has started threads can deadlock the child. A forkserver
    imports the caller's main module in the workers, so a calling script needs ``if __name__ == "__main__":``
    (``ablate`` and ``python -m ablations`` have it); without it drawing falls back to one process."""
    if "tensorflow" not in sys.modules and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["ablations.report.render"])
    return ctx


def _init(run: RunData, plan: Plan, out: Path) -> None:
    figures.theme()
    _STATE.update(run=run, plan=plan, out=out)


def _run_figure(key: str) -> tuple[Figure | None, list[str]]:
    problems: list[str] = []
    run = _STATE["run"]
    fig = figures.draw(figures.get("run", key), (run, _STATE["plan"]), run.table, _STATE["out"], problems)
    return fig, problems


def _arm_figures(view: ArmView, folder: Path) -> tuple[list[Figure], list[str]]:
    figures.theme()
    folder.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    figs = [f for spec in figures.specs("arm")
            if (f := figures.draw(spec, (view,), view.table, folder, problems)) is not None]
    return figs, problems


def draw_all(run: RunData, plan: Plan, out: Path, views: list[ArmView], folders: list[Path],
             workers: int | None = None) -> tuple[list[Figure], list[tuple[list[Figure], list[str]]], list[str]]:
    """Draws the run-level figures and every arm's figures.

    Returns:
        ``(figures, per_arm, problems)``: the run-level figures in page order, ``(figures,
        problems)`` for each arm in ``views`` order, and the run-level problems.
    """
    workers = default_workers(len(views)) if workers is None else workers
    keys = [spec.key for spec in figures.specs("run")]
    if workers <= 1:
        _init(run, plan, out)
        results = [_run_figure(k) for k in keys]
        per_arm = [_arm_figures(v, f) for v, f in zip(views, folders)]
    else:
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_init,
                                     initargs=(run, plan, out)) as pool:
                run_futs = [pool.submit(_run_figure, k) for k in keys]  # the slow ones first
                arm_futs = [pool.submit(_arm_figures, v, f) for v, f in zip(views, folders)]
                results = [f.result() for f in run_futs]
                per_arm = [f.result() for f in arm_futs]
        except (BrokenProcessPool, RuntimeError, OSError) as err:  # e.g. a script without a __main__ guard
            warnings.warn(f"drawing in {workers} processes failed ({type(err).__name__}: {err}); drawing in "
                          f"this process instead", RuntimeWarning, stacklevel=2)
            return draw_all(run, plan, out, views, folders, workers=1)
    drawn = [f for f, _ in results if f is not None]
    problems = [p for _, ps in results for p in ps]
    return drawn, per_arm, problems
