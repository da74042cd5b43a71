"""Terminal output with rich: a sweep progress bar, a per-arm bar, a line per arm and a summary table.

On a terminal the bars redraw in place; in a log (stdout not a terminal) there are no bars, only one line per
arm, numbered, so a log never holds the same bar again and again.
"""

from __future__ import annotations

import math
from typing import Any

# rich imports these lazily while it renders, which is on its refresh thread for the progress bars; under
# TFDS/etils' lazy-import hooks such an import from a thread once failed ("Relative import statements not
# supported"), killing the display. Imported here, in the main thread, they are never imported later.
import rich._emoji_replace  # noqa: F401
import rich.ansi  # noqa: F401
import rich.markup  # noqa: F401
import rich.pretty  # noqa: F401
import rich.progress_bar  # noqa: F401
import rich.spinner  # noqa: F401
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

STATUS_STYLE = {"completed": "green", "diverged": "yellow", "pruned": "magenta", "failed": "bold red"}


def styled(status: str) -> str:
    """Rich markup for a status (plain text for an unknown one: an empty style tag is a markup error)."""
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def fmt(x: Any, spec: str = ".3g", missing: str = "-") -> str:
    """Formats a number for a table cell (the terminal's and the report's).

    Args:
        x: a number (formatted with ``spec``), None or NaN (``missing``), or anything else (``str``; a bool
            stays ``True``/``False`` rather than becoming 1/0).
        spec: format spec of numbers.
        missing: text of a missing value (the report uses an en dash, the terminal ASCII).
    """
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


class SweepUI:
    """Progress display for a sweep (works on terminals and in logs)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        # markup=False: arm ids are shown as they are (and no markup parsing on the refresh thread).
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False, disable=not self.live)
        self.sweep_task = None
        self.arm_task = None
        self.total = 0
        self.finished = 0

    def start(self, n_arms: int) -> None:
        self.total, self.finished = n_arms, 0
        self.progress.start()
        self.sweep_task = self.progress.add_task("sweep", total=n_arms)

    def note(self, message: str) -> None:
        """A message above the bars (e.g. which finished arms are trained again, and why)."""
        self.progress.console.print(message, highlight=False, markup=False)

    def _count(self) -> str:
        return "" if self.live or not self.total else f"[{self.finished}/{self.total}] "

    def arm_callback(self, arm: Any) -> Any:
        import keras

        ui = self

        class _ArmProgress(keras.callbacks.Callback):
            async_safe = True  # host-side counter only: never reads device values

            def on_train_begin(self, logs: Any = None) -> None:
                # An arm may train in several fits (one per epoch, or a resumed partial epoch): one bar.
                total = self.params.get("epochs", 1) * (self.params.get("steps") or 0)
                if getattr(self, "_task", None) is None or ui.arm_task != self._task:
                    if ui.arm_task is not None:
                        ui.progress.remove_task(ui.arm_task)
                    ui.arm_task = self._task = ui.progress.add_task(f"  {arm.id}", total=total or None)
                else:
                    ui.progress.update(ui.arm_task, total=total or None)
                self._epoch = 0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self._epoch = epoch

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                steps = self.params.get("steps") or 0
                ui.progress.update(ui.arm_task, completed=self._epoch * steps + batch + 1)

        return _ArmProgress()

    def arm_done(self, arm: Any, summary: dict[str, Any], skipped: bool) -> None:
        if self.arm_task is not None:
            self.progress.remove_task(self.arm_task)
            self.arm_task = None
        self.progress.advance(self.sweep_task)
        self.finished += 1
        status = summary.get("status", "?")
        final = summary.get("final") or {}
        if skipped:
            self.progress.console.print(f"[dim]{self._count()}= {arm.id}: {status} earlier, skipped[/dim]",
                                        highlight=False)
            return
        extra = summary.get("error") or (f"diverged at step {summary['diverged_at_step']}"
                                         if status == "diverged" else "")
        self.progress.console.print(
            f"{self._count()}{styled(status)}{' ' * max(1, 10 - len(status))}{arm.id}  loss {fmt(final.get('loss'))}  "
            f"acc {fmt(final.get('accuracy'))}  first/last grad {fmt(summary.get('ratio_final'), '.2e')}  "
            f"{fmt(summary.get('wall_time_s'), '.1f')}s {escape(str(extra))}", highlight=False)
        for line in arm_notes(summary):
            self.progress.console.print(f"          [cyan]note[/cyan]: {escape(line)}", highlight=False)
        for line in verdict_lines(summary.get("verdicts") or []):
            self.progress.console.print(f"          {line}", highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def arm_notes(summary: dict[str, Any]) -> list[str]:
    """What block discovery said, for arms whose blocks were not found by the zoo convention (or not at all):
    a model without blocks gets no ratio, decay rate or gradient-flow verdict, and must say so."""
    if summary.get("block_rule") == "zoo" or "notes" not in summary:
        return []
    return list(summary.get("notes") or [])


def verdict_lines(verdicts: list[dict[str, Any]], fixes: int = 3) -> list[str]:
    """Rich lines for a terminal: each verdict, then up to ``fixes`` of its fixes with their sources."""
    from rich.markup import escape

    from ablations.diagnose import fix_text

    out = []
    for v in verdicts:
        out.append(f"[yellow]{v['kind']}[/yellow]: {escape(v['message'])}")
        out += [f"  try: {escape(fix_text(f))}" for f in (v.get("fixes") or [])[:fixes]]
    return out


def summary_table(summaries: list[dict[str, Any]], title: str = "arms") -> Table:
    """A rich table of arm results."""
    t = Table(title=title)
    for col in ("arm", "status", "loss", "acc", "val loss", "val acc", "first/last grad (init)",
                "first/last grad (final)", "decay rate", "verdicts", "time s"):
        t.add_column(col, justify="left" if col in ("arm", "status") else "right")
    for s in summaries:
        f = s.get("final") or {}
        st = s.get("status", "?")
        t.add_row(s["arm_id"], styled(st), fmt(f.get("loss")), fmt(f.get("accuracy")),
                  fmt(f.get("val_loss")), fmt(f.get("val_accuracy")), fmt(s.get("ratio_init"), ".2e"),
                  fmt(s.get("ratio_final"), ".2e"), fmt(s.get("decay_rate_final"), ".2f"),
                  ", ".join(sorted({v["kind"] for v in s.get("verdicts") or []})) or "-",
                  fmt(s.get("wall_time_s"), ".1f"))
    return t
