"""Loads a run folder into DataFrames for the report (the report reads files only, never a live model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ablations import store


@dataclasses.dataclass
class RunData:
    """Everything a report needs from one run folder."""

    root: Path
    experiment: dict[str, Any]
    experiment_yaml: str
    summaries: list[dict[str, Any]]
    history: pd.DataFrame
    epochs: pd.DataFrame
    params: pd.DataFrame
    blocks: pd.DataFrame
    axes: list[str]  # grid keys that take more than one value (seeds excluded)

    @property
    def name(self) -> str:
        return self.experiment.get("name", self.root.name)


def _short(key: str, keys: list[str]) -> str:
    last = key.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in keys) == 1 else key


def load_run(root: Path) -> RunData:
    """Reads ``experiment.yaml``, every arm's summary and tables; adds short axis columns (``depth`` ->
    ``model_depth`` style names are avoided: a grid key ``model.depth`` becomes column ``model.depth``)."""
    root = Path(root)
    exp_file = root / "experiment.yaml"
    if not exp_file.exists():
        raise FileNotFoundError(f"{root} is not a run folder (no experiment.yaml); run `ablate run` first")
    text = exp_file.read_text()
    exp = yaml.safe_load(text) or {}
    summaries = sorted(store.load_summaries(root), key=lambda s: s.get("index", 0))
    grid = exp.get("grid") or {}
    axes = [k for k, v in grid.items() if len({json.dumps(x, sort_keys=True) for x in v}) > 1]
    tables = {t: store.load_table(root, t) for t in ("history", "epochs", "params", "blocks")}
    order = {s["arm_id"]: i for i, s in enumerate(summaries)}
    for t, df in tables.items():
        if not df.empty:
            df["arm_order"] = df["arm_id"].map(order)
    return RunData(root=root, experiment=exp, experiment_yaml=text, summaries=summaries, axes=axes, **tables)


def short_names(keys: list[str]) -> dict[str, str]:
    """Display names for grid keys (last component unless ambiguous)."""
    return {k: _short(k, keys) for k in keys}
