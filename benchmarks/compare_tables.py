"""Before/after equality of the stored tables: every shipped config, shrunk, run by two checkouts.

    python benchmarks/compare_tables.py --old /path/to/old/checkout [--new .] [--configs configs/*.yaml]

Each config runs with ``--set train.epochs=1 --set train.steps_per_epoch=N --set seeds=1
--set data.shuffle_buffer=0`` (N rounded up to a multiple of its steps_per_execution) and its depth axis
pinned to the smallest value, once per checkout (``PYTHONPATH`` set to it, same interpreter), into
separate folders; then every arm's Parquet tables are compared: same columns in the same order, and values
bitwise equal or within float32 round-off (relative 1e-6, reported per table). Exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

RTOL = 1e-6


def shrink(config: Path, steps: int) -> list[str]:
    """``--set`` options that make ``config`` quick: one short epoch, one seed, the smallest depth."""
    raw = yaml.safe_load(config.read_text()) or {}
    spe = int(((raw.get("train") or {}).get("steps_per_execution")) or 1)
    steps = -(-steps // spe) * spe  # a multiple of steps_per_execution, which the config check requires
    # No shuffling: the data order became a pure function of (seed, epoch) on 2026-12-02 (an intended change
    # of which batches an arm sees), so both sides must read the split in file order for the statistics to
    # be comparable at all.
    sets = ["train.epochs=1", f"train.steps_per_epoch={steps}", "seeds=1", "data.shuffle_buffer=0"]
    grid = raw.get("grid") or {}
    if "model.depth" in grid:
        sets.append(f"model.depth={min(grid['model.depth'])}")
    elif isinstance((raw.get("model") or {}).get("depth"), int) and raw["model"]["depth"] > 8:
        sets.append("model.depth=8")
    return sets


def run(tree: Path, config: Path, out: Path, steps: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "ablations", "run", str(config), "--out", str(out), "--no-report"]
    for s in [*shrink(config, steps), *extra]:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)


def compare_frames(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """``{"columns": ok, "bitwise": bool, "max_rel": float, "bad": [columns]}``."""
    out = {"columns": list(a.columns) == list(b.columns), "bitwise": True, "max_rel": 0.0, "bad": []}
    if not out["columns"] or len(a) != len(b):
        out.update(bitwise=False, bad=[f"columns/rows differ: {list(a.columns)} vs {list(b.columns)}, "
                                       f"{len(a)} vs {len(b)} rows"])
        return out
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype.kind not in "fc":
            if not np.array_equal(x, y):
                out["bitwise"] = False
                out["bad"].append(col)
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        same_nan = np.isnan(x) == np.isnan(y)
        both = ~np.isnan(x) & ~np.isnan(y)
        if not same_nan.all():
            out["bitwise"] = False
            out["bad"].append(f"{col} (NaN pattern)")
            continue
        if not np.array_equal(x[both], y[both]):
            out["bitwise"] = False
            rel = np.abs(x[both] - y[both]) / np.maximum(np.abs(y[both]), 1e-30)
            out["max_rel"] = max(out["max_rel"], float(rel.max()))
            if rel.max() > RTOL:
                out["bad"].append(f"{col} (max rel {rel.max():.2e})")
    return out


def compare_runs(old: Path, new: Path) -> list[dict]:
    rows = []
    for arm in sorted((old / "arms").glob("*")):
        other = new / "arms" / arm.name
        for table in sorted(arm.glob("*.parquet")):
            twin = other / table.name
            if not twin.exists():
                rows.append({"arm": arm.name, "table": table.stem, "bitwise": False, "max_rel": None,
                             "bad": ["missing in new"]})
                continue
            res = compare_frames(pd.read_parquet(table), pd.read_parquet(twin))
            rows.append({"arm": arm.name, "table": table.stem, **res})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="checkout of the commit before the change")
    p.add_argument("--new", type=Path, default=Path("."), help="checkout after the change (default: .)")
    p.add_argument("--configs", nargs="+", default=sorted(glob.glob("configs/*.yaml")))
    p.add_argument("--steps", type=int, default=6, help="steps per epoch of the shrunken runs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="more --set items for both sides (e.g. capture.every=1 to capture every step)")
    p.add_argument("--keep", type=Path, default=None, help="keep both sides' run folders here (default: a temp dir)")
    args = p.parse_args()
    results, ok = [], True
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(args.keep or scratch)
        for cfg in args.configs:
            cfg = Path(cfg).resolve()
            outs = {}
            for side, tree in (("old", args.old), ("new", args.new)):
                out = Path(tmp) / side
                proc = run(tree.resolve(), cfg, out, args.steps, args.extra)
                if proc.returncode not in (0, 1):
                    print(f"{cfg.name}: {side} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                    ok = False
                outs[side] = out / (yaml.safe_load(cfg.read_text())["name"])
            rows = compare_runs(outs["old"], outs["new"])
            for r in rows:
                r["config"] = cfg.name
            results.extend(rows)
            bad = [r for r in rows if r["bad"]]
            ok &= not bad
            bitwise = sum(r["bitwise"] for r in rows)
            print(f"{cfg.name}: {len(rows)} tables, {bitwise} bitwise equal, "
                  f"max rel diff {max((r['max_rel'] or 0) for r in rows) if rows else 0:.2e}, {len(bad)} mismatched")
            for r in bad:
                print(f"   {r['arm']}/{r['table']}: {', '.join(r['bad'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
