"""Loads run folders into DataFrames for the report (the report reads files only, never a live model).

One :class:`RunData` holds a whole run: the summaries (one dict per arm, in sweep order), every arm's tables
concatenated in long format with ``arm_id``, ``seed`` and the arm's grid values as extra columns, and the
list of grid ``axes`` that actually vary. :func:`merge_runs` stacks several runs into one RunData with an
extra ``run`` axis, so a comparison report is drawn by exactly the same figure code.

Only the arms of the experiment in ``experiment.yaml`` are reported, each only if its stored config is that
arm's (a folder keeps the arms of earlier grids and earlier base values: they are listed apart, in
``others``, never mixed into figures or confidence intervals). A damaged arm (unreadable summary or table, a
required table missing) is left out and named in ``damaged``; the healthy arms are reported.
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
OPTIONAL_TABLES = tuple(t for t in TABLES if t not in store.REQUIRED_TABLES)
RUN_AXIS = "run"  # the extra axis of a comparison of several runs
PROBE_SOURCE = "ablations.Probe"  # experiment.yaml's `source` in run folders of models trained outside a config


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
    damaged: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # arm_id -> what is damaged
    others: dict[str, str] = dataclasses.field(default_factory=dict)  # arm_id -> why it is not reported
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. an arm lacking a table its peers have

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


def _experiment(root: Path) -> tuple[dict[str, Any], str]:
    """``(experiment dict, text)`` of ``root/experiment.yaml``.

    Raises:
        FileNotFoundError: ``root`` is not a run folder.
        StoreError: the file is unreadable or not an experiment.
    """
    exp_file = root / "experiment.yaml"
    if not exp_file.exists():
        raise FileNotFoundError(f"{root} is not a run folder (no experiment.yaml); run `ablate run` first")
    try:
        text = exp_file.read_text(encoding="utf-8")
        exp = yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise store.StoreError(f"{exp_file} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                               f"rerun `ablate run` on the experiment's config to rewrite it") from None
    if not isinstance(exp, dict):
        raise store.StoreError(f"{exp_file} is damaged (it holds a {type(exp).__name__}, not an experiment); "
                               f"rerun `ablate run` on the experiment's config to rewrite it")
    return exp, text


def _current_arms(exp: dict[str, Any], notes: list[str]) -> dict[str, dict[str, Any]] | None:
    """``{arm id: resolved config}`` of the experiment, or None (with a note) when it no longer expands."""
    from ablations.config import ConfigError, parse_experiment

    if exp.get("source") == PROBE_SOURCE:  # written by ablations.Probe / ablate diagnose: no config to expand
        return None
    try:
        arms = parse_experiment({k: v for k, v in exp.items() if k != "search"}, source="experiment.yaml").arms()
    except ConfigError as err:
        notes.append(f"experiment.yaml does not validate with this version ({str(err).splitlines()[0][:200]}); "
                     f"every finished arm in the folder is shown")
        return None
    return {a.id: a.config.model_dump(mode="json") for a in arms}


def _arm_tables(arm_dir: Path, summary: dict[str, Any]) -> dict[str, pd.DataFrame | None]:
    """Every table of one arm (None where it has none); raises StoreError naming a damaged file."""
    return {t: store.read_table(arm_dir, t, summary) for t in TABLES}


def load_run(root: Path) -> RunData:
    """Reads ``experiment.yaml`` and the summary, config and tables of every arm of it in the run folder.

    Raises:
        FileNotFoundError: ``root`` is not a run folder.
        StoreError: ``experiment.yaml`` is damaged.
    """
    root = Path(root)
    exp, text = _experiment(root)
    notes: list[str] = []
    current = _current_arms(exp, notes)
    summaries, configs, errors, damaged, others = [], {}, {}, {}, {}
    frames: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for arm_dir in sorted((root / "arms").glob("*")):
        check = store.check_arm(arm_dir)
        arm_id = check.summary["arm_id"] if check.summary else arm_dir.name
        if check.summary is None and not check.problems:
            continue  # not finished (interrupted, or training now)
        if current is not None and arm_dir.name not in current:
            others[arm_dir.name] = "not an arm of the current experiment.yaml (an earlier grid?)"
            continue
        if check.problems:
            damaged[arm_id] = check.problems
            continue
        if current is not None:
            keys = _changed(arm_dir, current[arm_dir.name])
            if keys:
                others[arm_id] = "trained with an earlier config (" + ", ".join(keys[:4]) + ")"
                continue
        try:
            tables = _arm_tables(arm_dir, check.summary)
        except store.StoreError as err:
            damaged[arm_id] = [str(err)]
            continue
        summaries.append(check.summary)
        configs[arm_id] = _stored_arm_yaml(arm_dir)
        if check.summary.get("status") == "failed" and (arm_dir / "error.txt").exists():
            errors[arm_id] = (arm_dir / "error.txt").read_text(errors="replace")
        for t, df in tables.items():
            if df is not None:
                frames[t].append(df)
    summaries.sort(key=lambda s: s.get("index", 0))
    notes += _missing_tables(root, summaries, configs)
    order = {s["arm_id"]: i for i, s in enumerate(summaries)}
    tables = {t: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame() for t, parts in frames.items()}
    for df in tables.values():
        if not df.empty:
            df["arm_order"] = df["arm_id"].map(order)
    return RunData(root=root, experiment=exp, experiment_yaml=text, summaries=summaries,
                   axes=_varying(exp.get("grid") or {}), arm_configs=configs, errors=errors, sources=[root],
                   damaged=damaged, others=others, notes=notes, tables=tables)


def _changed(arm_dir: Path, config: dict[str, Any]) -> list[str]:
    """Keys where the arm's stored config differs from the experiment's arm (the experiment's name is a label:
    a run folder copied under another name still holds the same arms)."""
    keys = store.changed_keys(arm_dir, config)
    return ["arm.yaml unreadable"] if keys is None else [k for k in keys if k != "experiment"]


def _stored_arm_yaml(arm_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((arm_dir / "arm.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _missing_tables(root: Path, summaries: list[dict[str, Any]], configs: dict[str, dict[str, Any]]) -> list[str]:
    """Notes for arms that lack an optional table (time_grads, grad_hist, gates) which arms of the same model
    and capture settings have: such a file was deleted or lost, and its figures would silently lack the arm."""
    groups: dict[str, list[str]] = {}
    for s in summaries:
        if s.get("status") not in store.DONE_STATUSES:
            continue  # a failed arm may have stopped before any table
        cfg = configs.get(s["arm_id"], {})
        key = json.dumps([(cfg.get("model") or {}).get("arch"), cfg.get("capture")], sort_keys=True)
        groups.setdefault(key, []).append(s["arm_id"])
    notes = []
    for ids in groups.values():
        for t in OPTIONAL_TABLES:
            have = [a for a in ids if (root / "arms" / a / f"{t}.parquet").exists()]
            if have and len(have) < len(ids):
                missing = [a for a in ids if a not in have]
                notes.append(f"{', '.join(missing)}: no {t}.parquet, which {len(have)} arm(s) of the same model "
                             f"and capture settings have (deleted?); its figures lack these arms")
    return notes


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
    damaged = {f"{name}/{a}": p for name, r in zip(names, runs) for a, p in r.damaged.items()}
    others = {f"{name}/{a}": w for name, r in zip(names, runs) for a, w in r.others.items()}
    notes = [f"{name}: {n}" for name, r in zip(names, runs) for n in r.notes]
    return RunData(root=runs[0].root, experiment={"name": title, "description": "\n".join(descriptions)},
                   experiment_yaml=yaml_text, summaries=summaries, axes=axes, arm_configs=configs,
                   errors=errors, sources=[r.root for r in runs], damaged=damaged, others=others, notes=notes,
                   tables=tables)


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
