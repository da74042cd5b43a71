"""Rerun the hostile-user cases of issue #17 through the real CLI and print (case, exit, message) as a table.

    python benchmarks/hostile_cases.py [--only SUBSTRING] [--json out.json] [--markdown out.md]

Every case runs ``python -m ablations ...`` in a fresh temporary folder (a separate process, so TensorFlow
import time and exit codes are the user's), on a tiny digits experiment; cases that need a fault the shell
cannot make (a full disk, Ctrl-C) patch one function in a small wrapper and call the same ``main``. Each
row says what was expected (``exit`` and a phrase the message must contain), what happened, and ``ok``.
Exit 1 when a case does not behave as expected. About 4 minutes on 2 cores (it trains a few 1-epoch arms).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

TINY = {
    "name": "h",
    "data": {"name": "digits", "batch_size": 256},
    "model": {"arch": "plain_mlp", "depth": 2, "width": 16, "activation": "relu"},
    "train": {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.05}},
    "grid": {"model.activation": ["relu", "tanh"]},
    "seeds": [0],
}

# Patched entry points for faults a config cannot cause (same ``main`` as the ``ablate`` script).
_ENOSPC = ("import errno, os, sys\n"
           "def full(*a, **k): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
           "os.{fn} = full\n"
           "from ablations.cli import main\nsys.exit(main(sys.argv[1:]))\n")
_SIGINT = ("import sys, ablations.sweep\n"
           "def interrupted(*a, **k): raise KeyboardInterrupt\n"
           "ablations.sweep.run_sweep = interrupted\n"
           "from ablations.cli import main\nsys.exit(main(sys.argv[1:]))\n")


@dataclasses.dataclass
class Case:
    """One hostile input: how to make it, what the CLI must answer."""

    item: str                       # the heading the case belongs to
    name: str                       # what the user did
    argv: Callable[[Path], list[str]]  # builds the case in a temp folder, returns the CLI arguments
    exit: int                       # the exit code the README promises
    expect: str                     # a regex the output must match (the message names what and where)
    wrapper: str | None = None      # python source run instead of ``-m ablations`` (fault injection)
    timeout: float = 300.0
    after: Callable[[Path, str], str | None] | None = None  # extra check on the folder; returns a problem


def _write(tmp: Path, cfg: dict | str, name: str = "c.yaml") -> Path:
    path = tmp / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def _with(**sections) -> dict:
    cfg = copy.deepcopy(TINY)
    for key, value in sections.items():
        head, _, rest = key.partition("__")
        if rest:
            cfg.setdefault(head, {})[rest] = value
        else:
            cfg[head] = value
    return cfg


def validate(**sections) -> Callable[[Path], list[str]]:
    sections.setdefault("grid", {})  # TINY's activation axis would override the value under test
    return lambda tmp: ["validate", str(_write(tmp, _with(**sections)))]


def validate_text(text: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["validate", str(_write(tmp, text))]


def run_cfg(cfg: dict, *extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["run", str(_write(tmp, cfg)), "--out", str(tmp / "runs"), "--no-report", *extra]


# ---- a finished two-arm run, copied into each damaged-folder case -----------------------------------------

_FINISHED: Path | None = None


def finished_run() -> Path:
    global _FINISHED
    if _FINISHED is None:
        root = Path(tempfile.mkdtemp(prefix="hostile_base_"))
        cfg = _write(root, TINY)
        proc = _ablate(["run", str(cfg), "--out", str(root / "runs"), "--no-report"], root, None, 600)
        if proc.returncode != 0:
            raise SystemExit(f"the base run failed:\n{proc.stdout[-3000:]}")
        _FINISHED = root
    return _FINISHED


def damaged(harm: Callable[[Path], None], command: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        base = finished_run()
        shutil.copytree(base / "runs", tmp / "runs")
        shutil.copy(base / "c.yaml", tmp / "c.yaml")
        arm = sorted((tmp / "runs" / "h" / "arms").iterdir())[0]
        harm(arm)
        if command == "report":
            return ["report", str(tmp / "runs" / "h"), "--out", str(tmp / "rep")]
        return ["run", str(tmp / "c.yaml"), "--out", str(tmp / "runs"), "--no-report"]
    return build


def _cut(arm: Path) -> None:
    table = arm / "params.parquet"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])


def _report_names_healthy(tmp: Path, out: str) -> str | None:
    page = tmp / "rep" / "index.html"
    if not page.exists():
        return "no report written for the healthy arm"
    return None if "damaged" in page.read_text() else "the report page does not say which arm is damaged"


def _retrained(tmp: Path, out: str) -> str | None:
    arms = sorted((tmp / "runs" / "h" / "arms").iterdir())
    bad = [a.name for a in arms if not (a / "summary.json").exists()]
    return f"not retrained: {bad}" if bad else None


def _stale(tmp: Path) -> list[str]:
    base = finished_run()
    shutil.copytree(base / "runs", tmp / "runs")
    cfg = _with(grid={"model.activation": ["relu", "selu"]})
    return ["run", str(_write(tmp, cfg)), "--out", str(tmp / "runs")]


def _stale_report(tmp: Path, out: str) -> str | None:
    page = (tmp / "reports" / "h" / "index.html")
    if not page.exists():
        page = next(iter(sorted(tmp.rglob("index.html"))), None)
    if page is None:
        return "no report"
    text = page.read_text()
    return None if re.search(r"not in the current|older|other arms", text, re.I) else "stale arm not set apart"


def _changed_base(tmp: Path) -> list[str]:
    base = finished_run()
    shutil.copytree(base / "runs", tmp / "runs")
    cfg = _with(train__epochs=2)
    return ["run", str(_write(tmp, cfg)), "--out", str(tmp / "runs"), "--no-report"]


def _bomb(where: str) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [*{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, "
                     f"*{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}]")
    anchors = "\n".join("x_" + l for l in lines)
    body = yaml.safe_dump({k: v for k, v in TINY.items() if k != "model"}, sort_keys=False)
    if where == "description":
        return f"{anchors}\ndescription: *j\nmodel: {{arch: plain_mlp, depth: 2}}\n{body}"
    model = "{arch: plain_mlp, depth: 2, activation: leaky_relu, activation_options: {negative_slope: *j}}"
    return f"{anchors}\nmodel: {model}\n{body}"


def _nested(tmp: Path) -> list[str]:
    return ["validate", str(_write(tmp, "name: n\nmodel: " + "[" * 5000 + "]" * 5000 + "\n"))]


def _latin1(tmp: Path) -> list[str]:
    path = tmp / "c.yaml"
    path.write_bytes(yaml.safe_dump(TINY).encode() + "description: caf\xe9\n".encode("latin-1"))
    return ["validate", str(path)]


def _corrupt_experiment(tmp: Path) -> list[str]:
    run = tmp / "runs" / "h"
    run.mkdir(parents=True)
    (run / "experiment.yaml").write_text("name: h\ngrid: {model.depth: [1, 2\n")
    return ["report", str(run), "--out", str(tmp / "rep")]


def _unwritable_report(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("x")
    return ["run", str(_write(tmp, TINY)), "--out", str(tmp / "runs"), "--report", str(tmp / "a_file" / "rep")]


def _tune_per_arm(tmp: Path) -> list[str]:
    cfg = _with(search={"tuner": "random", "max_trials": 1, "per_arm": True,
                        "space": {"train.optimizer.learning_rate": {"log_uniform": [0.01, 0.1]}}})
    path = _write(tmp, cfg)
    proc = _ablate(["tune", str(path), "--out", str(tmp / "runs"), "--no-report"], tmp, None, 600)
    if proc.returncode != 0:
        raise RuntimeError(f"tune failed: {proc.stdout[-500:]}")
    best = next(tmp.rglob("best.yaml"))
    return ["validate", str(best)]


def _verdicts(tmp: Path, out: str) -> str | None:
    kinds = []
    for summary in (tmp / "runs").rglob("summary.json"):
        data = json.loads(summary.read_text())
        kinds += [v.get("kind") if isinstance(v, dict) else str(v) for v in data.get("verdicts", [])]
    return f"false verdict: {kinds}" if "exploding" in kinds else None


def _ls_outside(tmp: Path, out: str) -> str | None:
    stray = [p for p in Path("/").glob("elsewhere*")]
    return f"wrote outside the run folder: {stray}" if stray else None


CASES = [
    # Wrong results recorded as good
    Case("wrong results", "model.depth: 0", validate(model__depth=0), 2, r"model\.depth.*(greater|>=|at least)"),
    Case("wrong results", "model.depth: -3", validate(model__depth=-3), 2, r"model\.depth"),
    Case("wrong results", "activation_options: {negative_slop: 0.3}",
         validate(model__activation="leaky_relu", model__activation_options={"negative_slop": 0.3}), 2,
         r"negative_slop.*negative_slope"),
    Case("wrong results", "initializer_options: {gian: 5.0}",
         validate(model__initializer="orthogonal", model__initializer_options={"gian": 5.0}), 2, r"gian.*gain"),
    Case("wrong results", "grid initializer_options.gain with glorot_uniform",
         validate(model__initializer="glorot_uniform", grid={"model.initializer_options.gain": [1.0, 5.0]}), 2,
         r"gain.*glorot_uniform|glorot_uniform.*gain"),
    Case("wrong results", "activation_options.negative_slope: 'big' (wrong type)",
         validate(model__activation="leaky_relu", model__activation_options={"negative_slope": "big"}), 2,
         r"negative_slope"),
    Case("wrong results", "seeds: [0, 0]", validate(seeds=[0, 0]), 2, r"seeds.*(twice|duplicate|repeat)"),
    Case("wrong results", "stochastic_depth_mlp, 10 tanh blocks, 3 epochs: no false `exploding`",
         run_cfg(_with(model={"arch": "stochastic_depth_mlp", "depth": 10, "width": 64, "activation": "tanh",
                              "branch_scale": "inv_sqrt_depth"}, grid={}, data={"name": "digits",
                                                                                   "batch_size": 64},
                       train={"epochs": 3, "optimizer": {"name": "sgd", "learning_rate": 0.01}})), 0,
         r"", after=_verdicts),
    Case("wrong results", "rezero_mlp 64x256, Adagrad, shorter than the window: no false `exploding`",
         run_cfg(_with(model={"arch": "rezero_mlp", "depth": 64, "width": 256}, grid={},
                       data={"name": "digits", "batch_size": 100},
                       train={"epochs": 1, "steps_per_epoch": 5,
                              "optimizer": {"name": "adagrad", "learning_rate": 0.01}})), 0, r"", after=_verdicts),
    Case("wrong results", "ablate tune per_arm: true, then validate best.yaml", _tune_per_arm, 0, r"arm"),
    # Damaged or stale run folders
    Case("damaged folders", "params.parquet cut in half: report", damaged(_cut, "report"), 0,
         r"damaged.*params\.parquet|params\.parquet.*damaged", after=_report_names_healthy),
    Case("damaged folders", "params.parquet cut in half: run", damaged(_cut, "run"), 0,
         r"damaged", after=_retrained),
    Case("damaged folders", "summary.json holding [1]: report",
         damaged(lambda a: (a / "summary.json").write_text("[1]"), "report"), 0, r"summary\.json",
         after=_report_names_healthy),
    Case("damaged folders", "summary.json holding [1]: run",
         damaged(lambda a: (a / "summary.json").write_text("[1]"), "run"), 0, r"damaged", after=_retrained),
    Case("damaged folders", "a finished arm's params.parquet deleted: report",
         damaged(lambda a: (a / "params.parquet").unlink(), "report"), 0, r"params\.parquet",
         after=_report_names_healthy),
    Case("damaged folders", "grid changed (relu,tanh -> relu,selu): report shows the current arms",
         _stale, 0, r"", after=_stale_report),
    Case("damaged folders", "base value changed (epochs 1 -> 2): says so before retraining", _changed_base, 0,
         r"train\.epochs"),
    # Paths and resources
    Case("paths and resources", "--set 'grid.model.activation_options./elsewhere/evil=[1]'",
         lambda t: ["validate", str(_write(t, TINY)), "--set",
                    "grid.model.activation_options./elsewhere/evil=[1]"], 2, r"/elsewhere/evil|key", after=_ls_outside),
    Case("paths and resources", "YAML alias bomb in description:", validate_text(_bomb("description")), 2,
         r"alias", timeout=60),
    Case("paths and resources", "YAML alias bomb in model.activation_options", validate_text(_bomb("options")), 2,
         r"alias", timeout=60),
    Case("paths and resources", "10^5-arm grid (over the 10,000 cap)",
         validate(grid={f"model.{k}": list(range(1, 11)) for k in ("depth", "width")} | {
             "train.epochs": list(range(1, 11)), "data.batch_size": list(range(1, 101))}), 2, r"max_arms", timeout=60),
    Case("paths and resources", "unknown activation", validate(model__activation="relux"), 2, r"relux.*relu"),
    Case("paths and resources", "unknown initializer", validate(model__initializer="he_normall"), 2,
         r"he_normall.*he_normal"),
    Case("paths and resources", "unknown dataset (`run`: validate does not import TFDS)",
         run_cfg(_with(data={"name": "digitz", "batch_size": 64})), 2, r"digitz.*digits"),
    Case("paths and resources", "missing split",
         run_cfg(_with(data={"name": "digits", "batch_size": 64, "val_split": "validation"})), 2,
         r"validation.*(split|train|test)"),
    Case("paths and resources", "batch larger than the data",
         run_cfg(_with(data={"name": "digits", "batch_size": 100000})), 2, r"batch_size"),
    Case("paths and resources", "unreachable TPU",
         run_cfg(_with(runtime={"strategy": "tpu", "tpu": "grpc://10.255.255.1:8470"})), 2, r"(?i)tpu"),
    Case("paths and resources", "negative seed", validate(seeds=[-1]), 2, r"seeds"),
    Case("paths and resources", "seeds: []", validate(seeds=[]), 2, r"seeds"),
    Case("paths and resources", "catalog dataset not downloadable (mnist here)",
         run_cfg(_with(data={"name": "mnist", "batch_size": 64})), 2, r"mnist", timeout=120),
    Case("paths and resources", "disk full while locking", run_cfg(TINY), 2, r"No space left.*\.lock|\.lock.*No space",
         wrapper=_ENOSPC.format(fn="pwrite")),
    Case("paths and resources", "disk full while writing results", run_cfg(TINY), 2, r"No space left",
         wrapper=_ENOSPC.format(fn="fsync")),
    Case("paths and resources", "unwritable report folder", _unwritable_report, 2, r"not writable"),
    Case("paths and resources", "corrupt experiment.yaml", _corrupt_experiment, 2, r"experiment\.yaml is damaged"),
    Case("paths and resources", "non-UTF-8 config", _latin1, 2, r"(?i)utf-8"),
    Case("paths and resources", "deeply nested config", _nested, 2, r"(?i)nest|deep"),
    Case("paths and resources", "name over 255 characters", validate(name="n" * 300), 2, r"name"),
    Case("paths and resources", "Ctrl-C during a run", run_cfg(TINY), 130, r"interrupted.*rerun", wrapper=_SIGINT),
    Case("paths and resources", "duplicate YAML keys",
         validate_text("name: d\nmodel: {depth: 2}\nmodel: {depth: 3}\n"), 2, r"(?i)duplicate.*model"),
    Case("paths and resources", "--set model.depth= (empty)",
         lambda t: ["validate", str(_write(t, TINY)), "--set", "model.depth="], 2, r"--set.*model\.depth"),
    Case("paths and resources", "--set error names --set, not the file's line",
         lambda t: ["validate", str(_write(t, TINY)), "--set", "model.depth=-1"], 2, r"--set"),
]


def _ablate(argv: list[str], cwd: Path, wrapper: str | None, timeout: float) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "200"}
    head = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "ablations"]
    try:
        return subprocess.run(head + argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(argv, -9, out + f"\n[killed after {timeout:.0f} s]", "")


def _message(text: str, expect: str) -> str:
    lines = [re.sub(r"\s+", " ", l).strip() for l in text.splitlines() if l.strip()]
    hit = next((l for l in lines if expect and re.search(expect, l)), None)
    flagged = next((l for l in lines if re.search(r"(?i)error|refus|damaged|cannot|traceback|interrupted", l)), None)
    return (hit or flagged or (lines[-1] if lines else ""))[:220]


def run_case(case: Case) -> dict:
    with tempfile.TemporaryDirectory(prefix="hostile_") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        try:
            argv = case.argv(tmp)
        except Exception as err:  # the case could not be built: a failure of this script, shown as such
            return {"item": case.item, "case": case.name, "exit": None, "seconds": 0.0,
                    "message": f"setup failed: {err}", "ok": False}
        proc = _ablate(argv, tmp, case.wrapper, case.timeout)
        text = proc.stdout + proc.stderr
        problem = None
        if proc.returncode != case.exit:
            problem = f"exit {proc.returncode}, expected {case.exit}"
        elif case.expect and not re.search(case.expect, re.sub(r"\s+", " ", text)):
            problem = f"message lacks /{case.expect}/"
        elif "Traceback" in text:
            problem = "traceback"
        elif case.after is not None:
            problem = case.after(tmp, text)
        return {"item": case.item, "case": case.name, "exit": proc.returncode,
                "seconds": round(time.perf_counter() - start, 1), "message": _message(text, case.expect),
                "ok": problem is None, "problem": problem}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="run the cases whose name contains this")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for case in CASES:
        if args.only and args.only not in case.name:
            continue
        row = run_case(case)
        rows.append(row)
        mark = "ok " if row["ok"] else "BAD"
        print(f"{mark} [{row['exit']}] {row['seconds']:6.1f}s  {case.name}: {row['message']}"
              + (f"   <- {row['problem']}" if row.get("problem") else ""), flush=True)
    md = ["| item | case | exit | s | message | ok |", "|---|---|---|---|---|---|"]
    md += [f"| {r['item']} | {r['case']} | {r['exit']} | {r['seconds']} | {r['message'].replace('|', '/')} | "
           f"{'yes' if r['ok'] else 'NO: ' + str(r.get('problem'))} |" for r in rows]
    if args.markdown:
        args.markdown.write_text("\n".join(md) + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} cases as expected")
    if _FINISHED is not None:
        shutil.rmtree(_FINISHED, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
