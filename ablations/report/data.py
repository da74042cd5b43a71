"""Loads run folders into DataFrames for the report (the report reads files only, never a live model).

One :class:`RunData` holds a whole run: the summaries (one dict per arm, in sweep order), every arm's tables
concatenated in long format with ``arm_id``, ``seed`` and the arm's grid values as extra columns, and the
list of grid ``axes`` that actually vary. :func:`merge_runs` stacks several runs into one RunData with an
extra ``run`` axis, so a comparison report is drawn by exactly the same figure code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ablations import instruments, store

# Every table a run folder may hold: Keras' per-epoch history plus every instrument's table (instruments that
# are off or do not apply leave theirs out; the figures then draw nothing from it).
TABLES = tuple(dict.fromkeys(["history", "epochs", *instruments.tables()]))
RUN_AXIS = "run"  # the extra axis of a comparison of several runs


@dataclasses.dataclass
class RunData:
    """Everything a report needs from one run folder (or from several merged by :func:`merge_runs`)."""

    root: Path
    experiment: dict[str, Any]
    experiment_yaml: str
    summaries: list[dict[str, Any]]
    tables: dict[str, pd.DataFrame]  # table name (TABLES) -> every arm's rows; empty when no arm has it
    axes: list[str]  # grid keys that take more than one value (seeds excluded)
    arm_configs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # arm_id -> arm.yaml
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # arm_id -> error.txt of failed arms
    sources: list[Path] = dataclasses.field(default_factory=list)  # run folders (several for a comparison)

    @property
    def name(self) -> str:
        return self.experiment.get("name", self.root.name)

    def table(self, name: str) -> pd.DataFrame:
        return self.tables.get(name, pd.DataFrame())

    def __getattr__(self, name: str) -> pd.DataFrame:  # run.params, run.blocks, run.gates, ...
        if name in TABLES:
            return self.__dict__.get("tables", {}).get(name, pd.DataFrame())
        raise AttributeError(name)

    def arm_config(self, arm_id: str) -> dict[str, Any]:
        return self.arm_configs.get(arm_id, {})

    def activation(self, arm_id: str) -> str | None:
        """The arm's activation name (from its resolved config), e.g. for theory overlays."""
        act = (self.arm_config(arm_id).get("model") or {}).get("activation")
        return act if isinstance(act, str) else None


def load_table(root: Path, name: str) -> pd.DataFrame:
    """Every arm's rows of table ``name`` (one of :data:`TABLES`) in the run folder ``root``.

    The report's only way to a stored table, so that its list of tables is the instruments' one.

    Raises:
        KeyError: ``name`` is not a table any instrument (or Keras' epoch history) writes.
    """
    if name not in TABLES:
        raise KeyError(f"no table {name!r}; the tables are {', '.join(TABLES)}")
    return store.load_table(root, name)


def _varying(grid: dict[str, list[Any]]) -> list[str]:
    return [k for k, v in grid.items() if len({json.dumps(x, sort_keys=True) for x in v}) > 1]


def load_run(root: Path) -> RunData:
    """Reads ``experiment.yaml``, every arm's summary, config and tables of the run folder ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a run folder.
    """
    root = Path(root)
    exp_file = root / "experiment.yaml"
    if not exp_file.exists():
        raise FileNotFoundError(f"{root} is not a run folder (no experiment.yaml); run `ablate run` first")
    text = exp_file.read_text()
    exp = yaml.safe_load(text) or {}
    summaries = sorted(store.load_summaries(root), key=lambda s: s.get("index", 0))
    tables = {t: load_table(root, t) for t in TABLES}
    configs, errors = {}, {}
    for arm_dir in sorted((root / "arms").glob("*")):
        summary = store.read_summary(arm_dir)
        if summary is None:
            continue
        try:
            configs[summary["arm_id"]] = yaml.safe_load((arm_dir / "arm.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            configs[summary["arm_id"]] = {}
        if summary.get("status") == "failed" and (arm_dir / "error.txt").exists():
            errors[summary["arm_id"]] = (arm_dir / "error.txt").read_text()
    order = {s["arm_id"]: i for i, s in enumerate(summaries)}
    for df in tables.values():
        if not df.empty:
            df["arm_order"] = df["arm_id"].map(order)
    return RunData(root=root, experiment=exp, experiment_yaml=text, summaries=summaries, tables=tables,
                   axes=_varying(exp.get("grid") or {}), arm_configs=configs, errors=errors, sources=[root])


def merge_runs(runs: list[RunData]) -> RunData:
    """Stacks several runs into one with an extra ``run`` axis (arm ids become ``<run>/<arm_id>``).

    Arms keep their sweep order within each run; runs keep the order given.
    """
    if len(runs) == 1:
        return runs[0]
    names: list[str] = []
    for r in runs:  # two runs of the same experiment name (e.g. two --out folders) stay distinct
        n, i = r.name, 2
        while n in names:
            n, i = f"{r.name}#{i}", i + 1
        names.append(n)
    summaries, configs, errors, frames = [], {}, {}, {t: [] for t in TABLES}
    for name, r in zip(names, runs):
        rename = {s["arm_id"]: f"{name}/{s['arm_id']}" for s in r.summaries}
        for s in r.summaries:
            summaries.append({**s, "arm_id": rename[s["arm_id"]], "index": len(summaries),
                              "values": {RUN_AXIS: name, **(s.get("values") or {})}})
        configs.update({rename[k]: v for k, v in r.arm_configs.items() if k in rename})
        errors.update({rename[k]: v for k, v in r.errors.items() if k in rename})
        for t in TABLES:
            df = r.table(t)
            if not df.empty:
                frames[t].append(df.assign(arm_id=df["arm_id"].map(rename), **{RUN_AXIS: name}))
    order = {s["arm_id"]: i for i, s in enumerate(summaries)}
    axes = [RUN_AXIS] + list(dict.fromkeys(a for r in runs for a in r.axes))
    filled = _fill_axes(summaries, configs, axes[1:])
    tables = {}
    for t, parts in frames.items():
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if not df.empty:
            df["arm_order"] = df["arm_id"].map(order)
            for axis, values in filled.items():  # same columns as store.load_table writes
                fill = df["arm_id"].map(values)
                df[axis] = fill.where(fill.notna(), df[axis]) if axis in df else fill
        tables[t] = df
    title = " vs ".join(names)
    yaml_text = "\n".join(f"# ---- {name} ({r.root})\n{r.experiment_yaml}" for name, r in zip(names, runs))
    descriptions = [f"{name}: {r.experiment.get('description', '')}".strip() for name, r in zip(names, runs)]
    return RunData(root=runs[0].root, experiment={"name": title, "description": "\n".join(descriptions)},
                   experiment_yaml=yaml_text, summaries=summaries, tables=tables, axes=axes, arm_configs=configs,
                   errors=errors, sources=[r.root for r in runs])


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _fill_axes(summaries: list[dict[str, Any]], configs: dict[str, dict[str, Any]],
               axes: list[str]) -> dict[str, dict[str, Any]]:
    """Gives every arm a value on every axis of a comparison: a run that did not vary an axis gets its
    arm's resolved setting (``model.depth`` pinned at 8 in one run becomes depth=8), so both runs share
    rows, columns and colours. A bundled axis (mapping values) takes the same keys from the arm's section.
    Fills ``values`` in place; returns ``{axis: {arm_id: table value}}`` for the arms filled."""
    filled: dict[str, dict[str, Any]] = {}
    for axis in axes:
        known = [s["values"][axis] for s in summaries if axis in s["values"]]
        keys = list(dict.fromkeys(k for v in known if isinstance(v, dict) for k in v))
        for s in summaries:
            if axis in s["values"]:
                continue
            cfg = configs.get(s["arm_id"], {})
            try:
                if keys:
                    section = _lookup(cfg, axis)
                    value: Any = {k: section[k] for k in keys if k in section}
                    if not value:
                        continue
                else:
                    value = _lookup(cfg, axis)
            except KeyError:
                continue
            s["values"][axis] = value
            filled.setdefault(axis, {})[s["arm_id"]] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return filled
