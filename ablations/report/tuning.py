"""The report of an ``ablate tune`` search: objective vs each searched value, trial history, and the
gradient flow of the best and worst trials (read from the search's arm folders, like every report).

Its figures are written by the run report's saver and its page rendered by the same Jinja environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import yaml

from ablations.diagnose import block_kernels
from ablations.report import environment
from ablations.report.data import load_table
from ablations.report.figures import theme
from ablations.report.plotting import BLOCK_AXIS, PALETTE, Figure, save, subplots
from ablations import store

SECTION = "Search"


def _searches(root: Path) -> list[Path]:
    base = root / "search"
    if store.has_trials(base):
        return [base]
    return sorted(p for p in base.iterdir() if store.has_trials(p)) if base.exists() else []


def _trials(sroot: Path) -> pd.DataFrame:
    rows = store.read_trials(sroot)
    out = []
    for r in rows:
        flat = {"trial": int(r["trial"]), "status": r["status"], "reason": r.get("reason", ""),
                "arms": r.get("arms", [])}
        flat.update({k: v for k, v in r.items() if k not in ("trial", "status", "reason", "arms", "values")})
        flat.update({f"hp:{k}": v for k, v in r["values"].items() if not k.startswith("tuner/")})
        out.append(flat)
    return pd.DataFrame(out).sort_values("trial")


def _objective_vs_values(done: pd.DataFrame, hps: list[str], name: str, direction: str, space: dict[str, Any],
                         out: Path, tag: str) -> Figure:
    colour = sns.color_palette(PALETTE)[0]
    fig, axes = subplots(1, len(hps), figsize=(3.6 * len(hps), 3.0), squeeze=False)
    for ax, col in zip(axes[0], hps):
        key = col[3:]
        data = done[[col, name]].copy()
        if data[col].dtype == object:
            data[col] = data[col].astype(str)
            sns.stripplot(data=data, x=col, y=name, ax=ax, color=colour, size=6)
        else:
            sns.scatterplot(data=data, x=col, y=name, ax=ax, color=colour, s=40)
            if (space.get(key) or {}).get("log_uniform"):
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{name} ({direction})")
    return save(fig, out, f"{tag}objective_vs_values", done[["trial", *hps, name]],
                "Objective vs each searched value", "Completed trials only.", section=SECTION)


def _trial_history(df: pd.DataFrame, done: pd.DataFrame, name: str, direction: str, out: Path, tag: str) -> Figure:
    fig, ax = subplots(1, 1, figsize=(5.5, 3.0))
    best = done[name].cummin() if direction == "min" else done[name].cummax()
    ax.plot(done["trial"], done[name], "o", color=sns.color_palette(PALETTE)[0], label="trial")
    ax.step(done["trial"], best, where="post", color=sns.color_palette(PALETTE)[1], label="best so far")
    for t in df[df["status"] != "completed"]["trial"]:
        ax.axvline(t, color="0.8", lw=1, zorder=0)
    ax.set_xlabel("trial (grey lines: pruned / diverged / failed)")
    ax.set_ylabel(name)
    ax.legend()
    return save(fig, out, f"{tag}trial_history", df[["trial", "status", name] if name in df else ["trial", "status"]],
                "Trial history", f"The objective of each completed trial and the best {name} so far.",
                section=SECTION)


def _objective_figs(df: pd.DataFrame, name: str, direction: str, space: dict[str, Any], out: Path,
                    tag: str) -> list[Figure]:
    done = df[df["status"] == "completed"]
    if done.empty:
        return []
    hps = [c for c in df.columns if c.startswith("hp:")]
    figs = [_objective_vs_values(done, hps, name, direction, space, out, tag)] if hps else []
    return figs + [_trial_history(df, done, name, direction, out, tag)]


def _flow_fig(sroot: Path, df: pd.DataFrame, name: str, direction: str, out: Path, tag: str) -> Figure | None:
    done = df[df["status"] == "completed"].sort_values(name, ascending=direction == "min")
    if done.empty:
        return None
    picks = {"best": done.iloc[0], "worst": done.iloc[-1]}
    params = load_table(sroot, "params")
    if params.empty:
        return None
    rows = []
    for label, tr in picks.items():
        k = block_kernels(params[params["arm_id"].isin(tr["arms"])])
        if k.empty:
            continue
        for when, step in (("init", k["step"].min()), ("end", k["step"].max())):
            rows.append(k[k["step"] == step].assign(which=f"{label} (trial {tr['trial']})", when=when))
    if not rows:
        return None
    data = pd.concat(rows, ignore_index=True)
    data = data[np.isfinite(data["grad_norm"]) & (data["grad_norm"] > 0)]
    g = sns.relplot(data=data, x="depth", y="grad_norm", hue="which", col="when", kind="line", marker="o",
                    palette=PALETTE, height=2.8, aspect=1.3, errorbar=("ci", 95), n_boot=200, seed=0)
    g.set(yscale="log")
    g.set_axis_labels(BLOCK_AXIS, "||dL/dW|| (L2, log)")
    return save(g, out, f"{tag}best_worst_gradient_flow", data[["which", "when", "arm_id", "depth", "grad_norm"]],
                "Gradient flow of the best and worst trials",
                "Block kernel-gradient norm against depth at the first (init) and last (end) captured step of the "
                "best and the worst completed trial (band: 95% CI over their arms).", section=SECTION)


def build_tuning_report(run_dir: Path, out: Path | None = None) -> Path:
    """Writes ``index.html`` of a search run folder and returns its path."""
    root = Path(run_dir)
    exp = yaml.safe_load((root / "experiment.yaml").read_text())
    search = exp.get("search") or {}
    obj = search.get("objective", "val_loss")
    from ablations.config import OBJECTIVES

    name, direction = (obj, OBJECTIVES[obj]) if isinstance(obj, str) else (obj["name"], obj["direction"])
    out = Path(out) if out else Path("reports") / exp["name"]
    out.mkdir(parents=True, exist_ok=True)
    theme()
    sections = []
    for sroot in _searches(root):
        df = _trials(sroot)
        if name not in df.columns:  # every trial pruned or failed: no objective recorded
            df[name] = np.nan
        tag = "" if sroot.name == "search" else f"{sroot.name}_".replace(",", "_").replace("=", "-")
        figs = _objective_figs(df, name, direction, search.get("space", {}), out, tag)
        flow = _flow_fig(sroot, df, name, direction, out, tag)
        if flow:
            figs.append(flow)
        table = df.drop(columns=["arms"]).to_dict("records")
        sections.append({"label": sroot.name if sroot.name != "search" else "search", "figures": figs,
                         "trials": table, "columns": [c for c in df.columns if c != "arms"]})
    best_yaml = (root / "best.yaml").read_text() if (root / "best.yaml").exists() else ""
    html = environment().get_template("tuning.html").render(
        name=exp["name"], description=exp.get("description", ""), objective=name, direction=direction,
        sections=sections, best_yaml=best_yaml, config=(root / "experiment.yaml").read_text())
    index = out / "index.html"
    index.write_text(html)
    if (root / "final" / "experiment.yaml").exists():  # per-arm tuning: the final comparison as a normal report
        from ablations.report import build_report

        build_report(root / "final", out / "final")
    return index
