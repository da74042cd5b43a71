"""``ablate reproduce``: published claims as a test suite.

Every ``configs/papers/<name>.yaml`` is an ordinary experiment with a ``claim:`` section (the paper, the claim
in one sentence, the paper's setup and number, what is measured here as expressions of
:mod:`ablations.claims`, and when it holds). :func:`run_claims` runs each claim's experiment through the same
sweep engine as ``ablate run`` (:func:`ablations.sweep.run_sweep`: resumable, arms shared with
``ablate run CONFIG``, run folder ``<out>/<name>``), evaluates the claim on the stored tables and returns one
:class:`ClaimResult` per claim: holds, does not hold, or could not run (and why).

Exit codes of ``ablate reproduce``: 0 when every selected claim ran and holds; 3 when at least one claim
does not hold; 4 when none fails but at least one could not run (a missing instrument, a failed or missing
arm, a NaN measurement); 2 for bad input (an unknown claim name, a config error), as for every command.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ablations.config import ClaimConfig, ConfigError, Experiment, load_experiment

CLAIMS_DIR = Path(__file__).resolve().parent.parent / "configs" / "papers"
HOLDS, NOT_HOLD, NOT_RUN = "holds", "does not hold", "could not run"
EXIT_OK, EXIT_NOT_HOLD, EXIT_NOT_RUN = 0, 3, 4


@dataclasses.dataclass
class ClaimResult:
    """One claim's outcome. ``seconds``: this invocation (0 for arms resumed from the run folder);
    ``train_seconds``: the arms' recorded wall time (``summary.json``), what training them costs."""

    name: str
    path: Path
    experiment: Experiment
    status: str
    values: dict[str, Any]
    reason: str = ""
    seconds: float = 0.0
    train_seconds: float = 0.0
    run_dir: Optional[Path] = None

    @property
    def claim(self) -> ClaimConfig:
        return self.experiment.claim

    def ours(self) -> str:
        """The shown measures, formatted (``name = value; ...``)."""
        from ablations.claims import format_value

        names = self.claim.show or list(self.claim.measure)
        return "; ".join(f"{n} = {format_value(self.values[n])}" for n in names if n in self.values)

    def to_json(self) -> dict[str, Any]:
        c = self.claim
        return {"claim": self.name, "paper": f"{c.paper.authors} {c.paper.year}", "title": c.paper.title,
                "statement": c.statement, "kind": c.kind, "quick": c.quick, "published": c.published,
                "ours": self.ours(), "expected": c.expected, "tolerance_source": c.tolerance.source,
                "tolerance": c.tolerance.note, "status": self.status, "reason": self.reason,
                "seconds": round(self.seconds, 1), "train_seconds": round(self.train_seconds, 1),
                "values": {k: _jsonable(v) for k, v in self.values.items()}}


def _jsonable(v: Any) -> Any:
    import numpy as np

    a = np.asarray(v)
    if a.dtype == object:
        return [str(x) for x in a.reshape(-1)]
    out = [None if isinstance(x, float) and not math.isfinite(x) else x for x in a.reshape(-1).tolist()]
    return out[0] if a.ndim == 0 else out


# ----------------------------------------------------------------------------------------------- choosing


def claim_files(directory: Path = CLAIMS_DIR) -> dict[str, Path]:
    """``{name: path}`` of every claim YAML in ``directory``, sorted by name."""
    return {p.stem: p for p in sorted(Path(directory).glob("*.yaml"))}


def load_claim(path: Path) -> Experiment:
    """The validated experiment of a claim YAML (every key, value and model option, as ``ablate run``).

    Raises:
        ConfigError: the file is not a valid experiment or has no ``claim:`` section.
    """
    exp = load_experiment(path)
    if exp.claim is None:
        raise ConfigError(f"{path}: no `claim:` section; `ablate reproduce` reads only claim configs")
    return exp


def select(names: Sequence[str] = (), quick: bool = False, directory: Path = CLAIMS_DIR
           ) -> list[tuple[Path, Experiment]]:
    """The claims to run: those named (all when none), only ``quick: true`` ones with ``quick``.

    Raises:
        ConfigError: an unknown name (with the closest match), or an invalid claim YAML.
    """
    from zoo.registry import suggest

    files = claim_files(directory)
    if not files:
        raise ConfigError(f"no claim YAMLs in {directory}")
    for n in names:
        if n not in files:
            raise ConfigError(f"unknown claim '{n}'.{suggest(n, list(files))} Claims: {', '.join(files)}")
    chosen = [(p, load_claim(p)) for n, p in files.items() if not names or n in names]
    return [(p, e) for p, e in chosen if not quick or e.claim.quick]


# ----------------------------------------------------------------------------------------------- running


def missing_instrument(exp: Experiment) -> Optional[str]:
    """Why the claim cannot run for want of an instrument (None when all it ``requires`` are there)."""
    for name in exp.claim.requires:
        try:
            from ablations import instruments

            instruments.get(name)
        except (ImportError, KeyError, AttributeError, ValueError):
            return f"needs capture.instruments.{name}, which is not registered in this version"
        enabled = getattr(exp.capture, "instruments", {}) or {}
        if not enabled.get(name):
            return f"needs capture.instruments.{name}: enable it in the claim's YAML"
    return None


def source(exp: Experiment, root: Path) -> Any:
    """The evaluator's view of the claim's run folder: exactly the experiment's arms."""
    from ablations.claims import RunSource

    return RunSource(root, [(a.id, a.config.model_dump(mode="json")) for a in exp.arms()])


def evaluate(exp: Experiment, src: Any) -> tuple[str, dict[str, Any], str]:
    """``(status, values, reason)`` of the claim on the stored tables (``src`` None for theory claims)."""
    from ablations.claims import ExpressionError, NotMeasurable, evaluate as value_of, truth

    parsed = exp.claim.compile()
    values: dict[str, Any] = {}
    for key, expr in parsed.items():
        if key.startswith("figure."):
            continue
        try:
            v = value_of(expr, src, values)
            verdict = truth(v) if key == "holds" else None
        except (NotMeasurable, ExpressionError) as err:
            return NOT_RUN, values, f"claim.{key}: {err}"
        if key == "holds":
            return (HOLDS if verdict else NOT_HOLD), values, ""
        values[key.split(".", 1)[1]] = v
    raise AssertionError("compile() always yields `holds`")  # pragma: no cover


def run_claim(path: Path, exp: Experiment, out: Path, *, ui: Any = None, train: bool = True) -> ClaimResult:
    """Runs (or resumes) the claim's experiment into ``out/<name>``, then evaluates it."""
    from ablations import store

    t0 = time.time()
    root = Path(out) / exp.name
    result = ClaimResult(path.stem, path, exp, NOT_RUN, {}, run_dir=root)
    why = missing_instrument(exp)
    if why:
        result.reason = why
    else:
        if exp.claim.kind != "theory" and train:
            from ablations.sweep import run_sweep

            run_sweep(exp, out, ui=ui)
        src = None if exp.claim.kind == "theory" else source(exp, root)
        result.status, result.values, result.reason = evaluate(exp, src)
    result.seconds = time.time() - t0
    result.train_seconds = sum(float((store.read_summary(root / "arms" / a.id) or {}).get("wall_time_s") or 0.0)
                               for a in exp.arms()) if exp.claim.kind != "theory" else 0.0
    return result


def run_claims(chosen: Sequence[tuple[Path, Experiment]], out: Path, *, ui_factory: Callable[[], Any] = lambda: None,
               on_claim: Callable[[ClaimResult], None] | None = None, train: bool = True) -> list[ClaimResult]:
    """Runs and evaluates every chosen claim in order; ``on_claim`` is called after each."""
    results = []
    for path, exp in chosen:
        r = run_claim(path, exp, out, ui=ui_factory(), train=train)
        results.append(r)
        if on_claim:
            on_claim(r)
    return results


def exit_code(results: Sequence[ClaimResult]) -> int:
    """0: all ran and hold; 3: some claim does not hold; 4: none fails but some could not run."""
    statuses = {r.status for r in results}
    if NOT_HOLD in statuses:
        return EXIT_NOT_HOLD
    return EXIT_NOT_RUN if NOT_RUN in statuses else EXIT_OK


def write_results(results: Sequence[ClaimResult], folder: Path) -> Path:
    """``results.json`` (one record per claim, with every measured value) into ``folder``."""
    from ablations import store

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    store.write_json(path, [r.to_json() for r in results])
    return path


# ----------------------------------------------------------------------------------------------- terminal

STYLE = {HOLDS: "green", NOT_HOLD: "bold red", NOT_RUN: "yellow"}


def results_table(results: Sequence[ClaimResult], title: str = "reproductions") -> Any:
    """A rich table: claim, paper's number, ours, tolerance, verdict, time."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, show_lines=True)
    for col, kw in [("claim", {}), ("paper's number", {"max_width": 34}), ("ours", {"max_width": 44}),
                    ("expected / tolerance", {"max_width": 40}), ("verdict", {}), ("time s", {"justify": "right"})]:
        t.add_column(col, **kw)
    for r in results:
        c = r.claim
        verdict = f"[{STYLE[r.status]}]{r.status}[/{STYLE[r.status]}]" + (f"\n{escape(r.reason)}" if r.reason else "")
        t.add_row(f"{r.name}\n[dim]{escape(c.paper.authors)} {c.paper.year} ({c.kind})[/dim]", escape(c.published),
                  escape(r.ours() or "-"), f"{escape(c.expected)}\n[dim]tolerance: {c.tolerance.source}[/dim]", verdict,
                  f"{r.seconds:.0f}\n[dim]train {r.train_seconds:.0f}[/dim]")
    return t


def claim_line(r: ClaimResult) -> str:
    """One rich line per finished claim (printed as the suite goes)."""
    from rich.markup import escape

    style = STYLE[r.status]
    why = f" ({r.reason})" if r.reason else ""
    return f"[{style}]{r.status:13}[/{style}] {r.name}: {escape((r.ours() or '-') + why)} [dim]{r.seconds:.0f} s[/dim]"
