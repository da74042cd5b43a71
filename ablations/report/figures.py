"""The report's figure registry: which figures a report draws, in which order.

Extension point (how to add a figure, e.g. for sequence models, transformers or tuning):

1. Write a function ``fn(run: RunData, plan: Plan, out: Path) -> Figure | None`` in a module of this
   package. It reads only ``run``'s DataFrames (``history``, ``epochs``, ``params``, ``blocks``,
   ``time_grads``; add a table to :data:`ablations.report.data.TABLES` if you store a new one), maps arms to
   colours and facets with ``plan`` (:func:`ablations.report.plotting.facet_lines` and ``band`` do the
   seed aggregation), writes ``<key>.png`` plus the plotted data as ``<key>.csv`` with
   :func:`ablations.report.plotting.save`, and returns the :class:`Figure`, whose ``section`` names the
   heading it appears under. It returns ``None`` when the run lacks its data (no recurrent layers, no
   validation split...), so every run gets exactly the figures that make sense.
2. Append it to :data:`FIGURES`. For the per-arm pages, write ``fn(arm: ArmView, out: Path) -> Figure |
   None`` (see :mod:`ablations.report.arm`) and append it to :data:`ARM_FIGURES`.

A figure function that raises does not stop the report: the error is shown on the page instead of the
figure (and the tests fail on it).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable

import seaborn as sns

from ablations.report import arm as arm_figs
from ablations.report import curves, gradflow, sequence
from ablations.report.data import RunData
from ablations.report.plotting import PALETTE, Figure, Plan, plan_for

FIGURES: list[Callable[[RunData, Plan, Path], Figure | None]] = [
    gradflow.decay_rate_summary,
    gradflow.gradient_vs_depth,
    gradflow.preact_vs_depth,
    gradflow.sigmoid_theory,
    gradflow.gradient_heatmaps,
    gradflow.update_ratio_vs_depth,
    gradflow.saturation_vs_depth,
    gradflow.dead_vs_depth,
    gradflow.branch_ratio_vs_depth,
    gradflow.gate_vs_depth,
    gradflow.rezero_alpha_vs_depth,
    gradflow.survival_vs_depth,
    gradflow.time_lag,
    sequence.gate_saturation,
    sequence.transformer_sublayers,
    curves.loss_curves,
    curves.epoch_curves,
]
ALL = FIGURES  # the walking skeleton's name

ARM_FIGURES: list[Callable[[arm_figs.ArmView, Path], Figure | None]] = [
    arm_figs.arm_gradients,
    arm_figs.arm_heatmaps,
    arm_figs.arm_grad_hist,
    arm_figs.arm_updates,
    arm_figs.arm_time_lag,
    arm_figs.arm_training,
]


def theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)


def _call(fn: Callable[..., Figure | None], args: tuple[Any, ...], problems: list[str]) -> Figure | None:
    try:
        return fn(*args)
    except Exception as err:  # one broken figure must not cost the whole report
        problems.append(f"figure {fn.__name__} failed: {type(err).__name__}: {err}")
        traceback.print_exc()
        return None


def make_figures(run: RunData, out: Path, plan: Plan | None = None,
                 problems: list[str] | None = None) -> list[Figure]:
    """Writes every run-level figure the run has data for into ``out``; errors go to ``problems``."""
    theme()
    plan = plan or plan_for(run)
    problems = problems if problems is not None else []
    return [f for fn in FIGURES if (f := _call(fn, (run, plan, out), problems)) is not None]


def make_arm_figures(arm: arm_figs.ArmView, out: Path, problems: list[str] | None = None) -> list[Figure]:
    """Writes every per-arm figure the arm has data for into ``out`` (the arm page's folder)."""
    problems = problems if problems is not None else []
    return [f for fn in ARM_FIGURES if (f := _call(fn, (arm, out), problems)) is not None]
