"""The ``ablate`` command line (also ``python -m ablations``).

Kept short on purpose: parsing here, logic in testable modules. TensorFlow is imported only by the
commands that train (``run``, ``tune``, ``theory``), after the config is valid, so ``--help``, ``validate``
and ``zoo`` answer at once and a config error costs no TensorFlow start-up. Exit codes: 0 every arm
completed or diverged, 1 an arm failed, 2 bad input (config, data, devices, locked/unwritable/full/damaged
folder), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_FAILED_ARMS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# OS errors that are the environment's, not a bug: reported in one line (exit 2) instead of a traceback.
_ENV_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
               errno.EISDIR, errno.ENAMETOOLONG)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show TensorFlow's own log lines (hidden by default)")
    p = argparse.ArgumentParser(prog="ablate", description="gradzoo: ablations of vanishing/exploding gradients.")
    p.add_argument("--verbose", action="store_true", default=False,
                   help="show TensorFlow's own log lines (hidden by default)")
    sub = p.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731

    run = add("run", help="train every arm of an experiment, then write its report")
    run.add_argument("config", type=Path)
    run.add_argument("--out", type=Path, default=Path("runs"), help="parent of the run folder (default: runs)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config value (YAML syntax), e.g. --set train.epochs=1; repeatable")
    run.add_argument("--report", type=Path, default=None, help="report folder (default: reports/<name>)")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    run.add_argument("--workers", type=int, default=0, metavar="N",
                     help="train in N local worker processes served by this one (keras-tuner chief); "
                          "KERASTUNER_* variables join workers from other machines (README: Scaling out)")

    val = add("validate", help="parse a config and list its arms; trains nothing")
    val.add_argument("config", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    rep = add("report", help="write the HTML report of a run folder (several: side by side)")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                     help="run folder(s), e.g. runs/quickstart; two or more are compared with the same axes")
    rep.add_argument("--out", type=Path, default=None,
                     help="report folder (default: reports/<name>, or reports/compare_<a>_vs_<b>)")

    add("zoo", help="list the models, their options and defaults")

    tune = add("tune", help="keras-tuner search over the config's `search:` space (resumable)")
    tune.add_argument("config", type=Path)
    tune.add_argument("--out", type=Path, default=Path("runs"), help="parent of the run folder (default: runs)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    tune.add_argument("--report", type=Path, default=None, help="report folder (default: reports/<name>)")
    tune.add_argument("--no-report", action="store_true", help="skip the report at the end")
    tune.add_argument("--workers", type=int, default=0, metavar="N",
                      help="run trials in N local worker processes served by this one (keras-tuner chief); "
                           "KERASTUNER_* variables join workers from other machines (README: Searching)")
    tune.add_argument("--point", default=None, help=argparse.SUPPRESS)  # set by a chief for its local workers

    _diagnose_parser(add)
    _reproduce_parser(add)

    th = add("theory", help="activation-derivative and attenuation tables, computed with autodiff")
    th.add_argument("--activations", nargs="+", default=None, metavar="NAME",
                    help="activations of the derivative table (default: every registered one)")
    th.add_argument("--d", dest="factors", nargs="+", default=None, metavar="D",
                    help="attenuation factors: numbers or activation names (= their max derivative); "
                         "default: sigmoid 0.2")
    th.add_argument("--depths", nargs="+", type=int, default=None, metavar="L",
                    help="depths of the attenuation table (default: 1 5 10 15 20 50)")
    th.add_argument("--csv", type=Path, default=None, metavar="DIR",
                    help="also write activations.csv and attenuation.csv into DIR")
    return p


def _diagnose_parser(add: Any) -> None:
    d = add("diagnose", help="probe a saved .keras model for N steps on a dataset and judge its gradients",
                       description="Exit codes: 0 no verdict, 3 verdicts found, 2 bad input, 1 training failed.")
    d.add_argument("model", type=Path, metavar="MODEL.keras")
    d.add_argument("--data", default="digits", help="TFDS dataset (default: digits, bundled)")
    d.add_argument("--steps", type=int, default=50, metavar="N",
                   help="probed training steps (default 50; 0: one batch at the loaded weights, no update)")
    d.add_argument("--batch", type=int, default=64, metavar="B", help="batch size (default 64)")
    d.add_argument("--loss", default="auto", metavar="L",
                   help="Keras loss name (default auto: the saved one, else from the dataset's task)")
    d.add_argument("--optimizer", default=None, metavar="O",
                   help="sgd, adam, adamw, rmsprop, adagrad (default: the saved one, else sgd)")
    d.add_argument("--lr", type=float, default=None, help="learning rate (default: the saved one, else 0.01)")
    d.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (registers the model's custom objects); repeatable")
    d.add_argument("--out", type=Path, default=None, help="run folder (default: runs/diagnose_<model>)")
    d.add_argument("--seed", type=int, default=0, help="data order and re-initialization seed (default 0)")
    d.add_argument("--try-fixes", action="store_true",
                   help="also train a copy with each applicable fix (activation, initializer, clipping, rate)")
    d.add_argument("--report", type=Path, default=None, help="report folder (default: reports/<run folder name>)")
    d.add_argument("--no-report", action="store_true", help="skip the report")


def _diagnose(args: argparse.Namespace, console: Console) -> int:
    from ablations import checkup

    opts = checkup.Options(model=args.model, data=args.data, steps=args.steps, batch=args.batch, loss=args.loss,
                           optimizer=args.optimizer, lr=args.lr, imports=tuple(args.imports), out=args.out,
                           seed=args.seed, try_fixes=args.try_fixes)
    return checkup.run(opts, console, report=args.report, no_report=args.no_report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    # Long paths and messages stay whole; in logs (no terminal) tables get room instead of 80 columns.
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    if args.verbose:
        from ablations.quiet import verbose_environment

        verbose_environment()
    from ablations.config import ConfigError
    from ablations.store import StoreError

    try:
        return {"run": _run, "validate": _validate, "report": _report, "zoo": _zoo,
                "theory": _theory, "tune": _tune, "diagnose": _diagnose,
                "reproduce": _reproduce}[args.command](args, console)
    except ConfigError as err:
        console.print(f"[bold red]config error[/]\n{escape(str(err))}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("\n[bold yellow]interrupted[/]; finished arms are kept: rerun the same command to resume",
                      highlight=False)
        return EXIT_INTERRUPTED
    except StoreError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        return EXIT_USAGE
    except OSError as err:
        if err.errno is None and err.args:  # ours, with its own message (e.g. "not a run folder")
            console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            return EXIT_USAGE
        if err.errno not in _ENV_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        console.print(f"[bold red]error:[/] cannot use{escape(where)}: {err.strerror}", highlight=False)
        return EXIT_USAGE
    except Exception as err:  # known user-facing errors carry their own message
        if _known(err):
            console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            return EXIT_USAGE
        raise


def _known(err: Exception) -> bool:
    """Errors of bad input that carry their own message (imported only once one happened: they live in
    modules that import TensorFlow-adjacent code)."""
    from ablations.data import DataError
    from ablations.distributed import SweepError
    from ablations.strategy import StrategyError

    return isinstance(err, (DataError, StrategyError, SweepError))


def _load(args: argparse.Namespace):
    """The validated experiment: every key, value and model option checked, arms expanded once (no TF)."""
    from ablations.config import load_experiment

    return load_experiment(args.config, args.overrides)


def _start_tensorflow(args: argparse.Namespace) -> None:
    from ablations.quiet import import_tensorflow

    import_tensorflow(verbose=getattr(args, "verbose", False))


def _tune(args: argparse.Namespace, console: Console) -> int:
    if args.workers < 0:
        console.print(f"[bold red]error:[/] --workers must be >= 0 (got {args.workers})", highlight=False)
        return EXIT_USAGE
    exp = _load(args)
    from ablations.config import ConfigError
    from ablations.tune import run_search, tuning_table
    from ablations.ui import SweepUI, summary_table

    if exp.search is None:
        raise ConfigError(f"{args.config}: no `search:` section; `ablate tune` needs one (README: Searching)")
    if not args.no_report:
        _check_report_folder(args.report or Path("reports") / exp.name)
    _start_tensorflow(args)
    t0 = time.time()
    result = run_search(exp, args.out, ui=SweepUI(console), console=console, workers=args.workers,
                        point=args.point)
    if "worker" in result:  # helped a chief, which prints the tables and writes the report
        trials = result["trials"]
        completed = sum(t["status"] == "completed" for t in trials)
        console.print(f"worker {result['worker']}: {len(trials)} trial(s), {completed} completed, "
                      f"{time.time() - t0:.0f} s", highlight=False)
        return EXIT_OK
    for point in result["points"]:
        console.print(tuning_table(exp, point))
    if result.get("final"):
        console.print(summary_table(result["final"], title=f"{exp.name}: every arm at its best values"))
    console.print(f"best config: [bold]{result['best_yaml']}[/] ({time.time() - t0:.0f} s)", highlight=False)
    if not args.no_report:
        from ablations.report.tuning import build_tuning_report

        index = build_tuning_report(args.out / exp.name, args.report)
        console.print(f"report: [bold]{index}[/]", highlight=False)
    return EXIT_OK


def _validate(args: argparse.Namespace, console: Console) -> int:
    exp = _load(args)
    arms = exp.arms()
    console.print(f"[bold]{exp.name}[/]: {len(arms)} arms "
                  f"({' x '.join(f'{len(v)} {k}' for k, v in exp.grid.items()) or '1 point'} x {len(exp.seeds)} seeds)")
    for arm in arms:
        console.print(f"  {arm.id}", highlight=False)
    names = sorted({a.config.data.name for a in arms})
    console.print(f"[dim]config and model options checked; data ({', '.join(names)}) and devices are checked by "
                  f"`ablate run` before any arm trains[/dim]", highlight=False)
    return EXIT_OK


def _check_report_folder(report: Path) -> None:
    """Refuses an unwritable report folder before training, rather than after it. It is created and written
    to (permission bits alone say nothing for root, or for /proc-like and read-only mounts)."""
    import tempfile

    from ablations.store import StoreError

    try:
        report.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=report):
            pass
    except OSError as err:
        raise StoreError(f"the report folder {report} is not writable ({err.strerror}); choose another "
                         f"--report, or --no-report") from None


def _run(args: argparse.Namespace, console: Console) -> int:
    exp = _load(args)
    if args.workers < 0:
        console.print(f"[bold red]error:[/] --workers must be >= 0 (got {args.workers})", highlight=False)
        return EXIT_USAGE
    if not args.no_report:
        _check_report_folder(args.report or Path("reports") / exp.name)
    _start_tensorflow(args)
    from ablations.sweep import run_sweep
    from ablations.ui import SweepUI, summary_table

    t0 = time.time()
    ui = SweepUI(console)
    summaries = run_sweep(exp, args.out, ui=ui, workers=args.workers)
    from ablations.sweep import worker_role

    role = worker_role(exp)
    if role:  # helped a chief, which prints the sweep's table and writes the report
        failed = [s for s in summaries if s.get("status") == "failed"]
        console.print(f"{role}: {len(summaries)} arm(s), {len(failed)} failed, {time.time() - t0:.0f} s",
                      highlight=False)
        return EXIT_FAILED_ARMS if failed else EXIT_OK
    console.print(summary_table(summaries, title=f"{exp.name}: {len(summaries)} arms in {time.time() - t0:.0f} s"))
    if not args.no_report:
        from ablations.report import build_report

        index = build_report(args.out / exp.name, args.report, on_note=_note_printer(console))
        console.print(f"report: [bold]{index}[/]", highlight=False)
    failed = [s for s in summaries if s.get("status") == "failed"]
    if failed:
        console.print(f"[bold red]{len(failed)} arm(s) failed[/]: " + ", ".join(s["arm_id"] for s in failed))
        return EXIT_FAILED_ARMS
    return EXIT_OK


def _report(args: argparse.Namespace, console: Console) -> int:
    from ablations.report import build_report

    index = build_report(args.run_dirs[0] if len(args.run_dirs) == 1 else args.run_dirs, args.out,
                         on_note=_note_printer(console))
    console.print(f"report: [bold]{index}[/]", highlight=False)
    return EXIT_OK


def _note_printer(console: Console) -> Callable[[str], None]:
    return lambda line: console.print(f"[yellow]{escape(line)}[/]", highlight=False)


def _zoo(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    import zoo
    from zoo.activations import ACTIVATIONS
    from zoo.initializers import INITIALIZERS
    from zoo.options import sub_options

    t = Table(title="gradzoo models")
    for col in ("model", "family", "options (defaults)", "paper"):
        t.add_column(col)
    for name in zoo.names():
        opts = ", ".join(f"{k}={v[0]!r}" for k, v in zoo.options(name).items())
        t.add_row(name, zoo.family(name), opts, zoo.paper(name))
    console.print(t)
    f = Table(title="activations and initializers: their options (activation_options, initializer_options)")
    for col in ("kind", "name", "options (defaults)"):
        f.add_column(col)
    for registry in (ACTIVATIONS, INITIALIZERS):
        for name in registry.names():
            opts = ", ".join(f"{p.name}={p.default!r}" for p in sub_options(registry, name).values())
            f.add_row(registry.kind, name, opts or "-")
    console.print(f)
    return EXIT_OK


def _theory(args: argparse.Namespace, console: Console) -> int:
    import math

    _start_tensorflow(args)

    from rich.table import Table

    from ablations import theory
    from zoo.registry import UnknownNameError

    try:
        acts = theory.activation_table(args.activations)
        att = theory.attenuation_table(args.factors or theory.DEFAULT_FACTORS, args.depths or theory.DEFAULT_DEPTHS)
    except (UnknownNameError, ValueError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return EXIT_USAGE
    fmt = lambda v: "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:.4g}"  # noqa: E731
    t = Table(title=f"activation derivatives (autodiff on z in [-{theory.Z_MAX:g}, {theory.Z_MAX:g}])")
    for col in ("activation", "max |d|", "at z", "d range", "z < 0 side", "z > 0 side", "|d| >= 5% max on z in"):
        t.add_column(col)
    for r in acts.itertuples(index=False):
        t.add_row(r.activation, fmt(r.max_derivative), fmt(r.argmax_z),
                  f"[{fmt(r.derivative_min)}, {fmt(r.derivative_max)}]", r.negative_side, r.positive_side,
                  f"[{fmt(r.live_from)}, {fmt(r.live_to)}]")
    console.print(t)
    a = Table(title="gradient attenuation d^L through L layers (|derivative| <= d, unit weights)")
    for col in att.columns:
        a.add_column(str(col), justify="right")
    for row in att.itertuples(index=False):
        a.add_row(str(row[0]), *(f"{v:.3g}" for v in row[1:]))
    console.print(a)
    if args.csv:
        args.csv.mkdir(parents=True, exist_ok=True)
        acts.to_csv(args.csv / "activations.csv", index=False)
        att.to_csv(args.csv / "attenuation.csv", index=False)
        console.print(f"tables: [bold]{args.csv}[/]", highlight=False)
    return EXIT_OK



# ------------------------------------------------------------------------------------- ablate reproduce


def _reproduce_parser(add) -> None:
    rp = add("reproduce", help="check published claims (configs/papers) on fresh or stored runs; exit 0 when "
                               "every claim holds, 3 when one does not, 4 when one could not run")
    rp.add_argument("names", nargs="*", metavar="NAME", help="claims to run (default: all; `--list` shows them)")
    rp.add_argument("--quick", action="store_true", help="only the quick set (about 20 min on 2 cores)")
    rp.add_argument("--out", type=Path, default=Path("runs"), help="parent of the run folders (default: runs)")
    rp.add_argument("--report", type=Path, default=Path("reports/reproductions"),
                    help="folder of the Reproductions page (default: reports/reproductions)")
    rp.add_argument("--no-report", action="store_true", help="skip the Reproductions page")
    rp.add_argument("--no-train", action="store_true", help="evaluate the stored runs only; train nothing")
    rp.add_argument("--list", action="store_true", help="list the claims and exit")
    rp.add_argument("--claims", type=Path, default=None, help="folder of claim YAMLs (default: configs/papers)")


def _reproduce(args: argparse.Namespace, console: Console) -> int:
    import rich.markup  # noqa: F401 - loaded now: a first import from rich's refresh thread can hit TFDS's lazy-import hook

    from ablations import reproduce as rp

    chosen = rp.select(args.names, args.quick, args.claims or rp.CLAIMS_DIR)
    if args.list:
        for path, exp in chosen:
            c = exp.claim
            console.print(f"{path.stem:34} {c.kind:8} {'quick' if c.quick else '     '} {c.paper.authors} "
                          f"{c.paper.year}: {c.statement}", highlight=False)
        return EXIT_OK
    if not args.no_report:
        _check_report_folder(args.report)
    if not args.no_train:
        _start_tensorflow(args)
    from ablations.ui import SweepUI

    t0 = time.time()
    console.print(f"[bold]{len(chosen)} claim(s)[/] into {escape(str(args.out))}", highlight=False)
    results = rp.run_claims(chosen, args.out, ui_factory=lambda: SweepUI(console), train=not args.no_train,
                            on_claim=lambda r: console.print(rp.claim_line(r), highlight=False))
    console.print(rp.results_table(results, title=f"reproductions: {len(results)} claims in {time.time() - t0:.0f} s"))
    if not args.no_report:
        from ablations.report.reproductions import build_reproductions

        index = build_reproductions(results, args.report, seconds=time.time() - t0)
        console.print(f"report: [bold]{escape(str(index))}[/]", highlight=False)
    code = rp.exit_code(results)
    counts = {s: sum(r.status == s for r in results) for s in (rp.HOLDS, rp.NOT_HOLD, rp.NOT_RUN)}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (exit code {code})", highlight=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
