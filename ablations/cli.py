"""The ``ablate`` command line (also ``python -m ablations``).

Kept short on purpose: parsing here, logic in testable modules. TensorFlow is imported only by the
commands that train or build models, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

EXIT_OK, EXIT_FAILED_ARMS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablate", description="gradzoo: ablations of vanishing/exploding gradients.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train every arm of an experiment, then write its report")
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, default=Path("runs"), help="parent of the run folder (default: runs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config value (YAML syntax), e.g. --set train.epochs=1; repeatable")
    run.add_argument("--report", type=Path, default=None, help="report folder (default: reports/<name>)")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")

    val = sub.add_parser("validate", help="parse a config and list its arms; trains nothing")
    val.add_argument("config", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    rep = sub.add_parser("report", help="write the HTML report of a run folder")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<name>)")

    sub.add_parser("zoo", help="list the models, their options and defaults")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    # Long paths and messages stay whole; in logs (no terminal) tables get room instead of 80 columns.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    from ablations.config import ConfigError

    try:
        return {"run": _run, "validate": _validate, "report": _report, "zoo": _zoo}[args.command](args, console)
    except ConfigError as err:
        console.print(f"[bold red]config error[/]\n{err}", highlight=False)
        return EXIT_USAGE
    except Exception as err:  # known user-facing errors carry their own message
        from ablations.data import DataError
        from ablations.store import StoreError

        if isinstance(err, (StoreError, DataError, FileNotFoundError)):
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            return EXIT_USAGE
        raise


def _load(args: argparse.Namespace):
    from ablations.config import ConfigError, load_experiment

    exp = load_experiment(args.config, args.overrides)
    import zoo

    for arm in exp.arms():  # model names and options are checked before anything trains
        try:
            zoo.check_options(arm.config.model.arch, arm.config.model.options())
        except (zoo.UnknownNameError, zoo.BadOptionError) as err:
            raise ConfigError(f"{args.config}: model (arm {arm.id}): {err}") from None
    return exp


def _validate(args: argparse.Namespace, console: Console) -> int:
    exp = _load(args)
    arms = exp.arms()
    console.print(f"[bold]{exp.name}[/]: {len(arms)} arms "
                  f"({' x '.join(f'{len(v)} {k}' for k, v in exp.grid.items()) or '1 point'} x {len(exp.seeds)} seeds)")
    for arm in arms:
        console.print(f"  {arm.id}", highlight=False)
    return EXIT_OK


def _run(args: argparse.Namespace, console: Console) -> int:
    exp = _load(args)
    from ablations.runner import run_experiment
    from ablations.ui import SweepUI, summary_table

    t0 = time.time()
    ui = SweepUI(console)
    summaries = run_experiment(exp, args.out, ui=ui)
    console.print(summary_table(summaries, title=f"{exp.name}: {len(summaries)} arms in {time.time() - t0:.0f} s"))
    if not args.no_report:
        from ablations.report import build_report

        index = build_report(args.out / exp.name, args.report)
        console.print(f"report: [bold]{index}[/]", highlight=False)
    failed = [s for s in summaries if s.get("status") == "failed"]
    if failed:
        console.print(f"[bold red]{len(failed)} arm(s) failed[/]: " + ", ".join(s["arm_id"] for s in failed))
        return EXIT_FAILED_ARMS
    return EXIT_OK


def _report(args: argparse.Namespace, console: Console) -> int:
    from ablations.report import build_report

    index = build_report(args.run_dir, args.out)
    console.print(f"report: [bold]{index}[/]", highlight=False)
    return EXIT_OK


def _zoo(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    import zoo

    t = Table(title="gradzoo models")
    for col in ("model", "family", "options (defaults)", "paper"):
        t.add_column(col)
    for name in zoo.names():
        opts = ", ".join(f"{k}={v[0]!r}" for k, v in zoo.options(name).items())
        t.add_row(name, zoo.family(name), opts, zoo.paper(name))
    console.print(t)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
