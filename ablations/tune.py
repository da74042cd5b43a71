"""``ablate tune``: keras-tuner searches over an experiment, every trial an arm of the run folder.

The YAML's ``search:`` section names the tuner (random, bayesian, hyperband, grid), the objective, the
space (dotted config keys -> ranges or choices) and what to prune. Each trial's values are written into
the experiment, the resulting arm runs through the same arm runner, probe and store as ``ablate run``
(:func:`ablations.runner.run_arm`), so every trial has its layer statistics and can be reported.

Pruning stops a trial early on a pathology found in its first captured steps (a ``vanishing`` verdict of
:mod:`ablations.diagnose`) or a non-finite loss; such trials are recorded (status ``pruned`` or
``diverged`` with the reason) and count as failed trials for the oracle, which then moves on.

``per_arm: true`` tunes the space separately for every grid point, then runs each grid point's seeds with
its best values (``final/``), so an ablation compares arms each at a fair learning rate.

Layout: ``runs/<name>/search[/<grid point>]/`` holds the trials' arm folders (``arms/trial_0003,...``) and
keras-tuner's oracle state (``.tuner/``), so a killed search resumes without redoing finished trials;
``best.yaml`` is the experiment with the best values filled in, runnable by ``ablate run``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

from ablations import store
from ablations.config import Arm, ArmConfig, ConfigError, Experiment, _set_path, _short_keys, _slug, dump_yaml

TUNER_DIR = ".tuner"


def hyperparameters(exp: Experiment) -> Any:
    """keras-tuner HyperParameters for ``search.space`` (choices of mappings travel as JSON strings)."""
    import keras_tuner as kt

    hp = kt.HyperParameters()
    for key, e in exp.search.space.items():
        if e.kind == "log_uniform":
            hp.Float(key, e.bounds[0], e.bounds[1], sampling="log")
        elif e.kind == "uniform":
            hp.Float(key, e.bounds[0], e.bounds[1], step=e.step)
        elif e.kind == "int":
            hp.Int(key, e.bounds[0], e.bounds[1], step=int(e.step or 1))
        else:
            values = e.choice
            if not all(isinstance(v, (int, float, str, bool)) for v in values) or len({type(v) for v in values}) > 1:
                values = [json.dumps(v, sort_keys=True) for v in values]
            hp.Choice(key, values, ordered=False)
    return hp


def _decode(exp: Experiment, key: str, value: Any) -> Any:
    e = exp.search.space[key]
    if e.kind == "choice" and isinstance(value, str) and value not in e.choice:
        return json.loads(value)
    return value


def make_oracle(exp: Experiment, hp: Any, max_epochs: int) -> Any:
    """The keras-tuner oracle named by ``search.tuner``."""
    import keras_tuner as kt

    s = exp.search
    name, direction = s.objective_spec()
    objective = kt.Objective(name, direction)
    common = dict(objective=objective, hyperparameters=hp, tune_new_entries=False, allow_new_entries=False,
                  max_consecutive_failed_trials=s.max_trials + 1)  # pruned trials never stop the search
    if s.tuner == "random":
        return kt.oracles.RandomSearchOracle(max_trials=s.max_trials, seed=s.seed, **common)
    if s.tuner == "bayesian":
        return kt.oracles.BayesianOptimizationOracle(max_trials=s.max_trials, seed=s.seed, **common)
    if s.tuner == "grid":
        return kt.oracles.GridSearchOracle(max_trials=s.max_trials, seed=s.seed, **common)
    return kt.oracles.HyperbandOracle(max_epochs=max_epochs, seed=s.seed, **common)


def trial_arm(exp: Experiment, base: dict[str, Any], values: dict[str, Any], seed: int, label: str) -> Arm:
    """The arm of one trial execution: ``base`` (a resolved arm dict) with the trial's values filled in."""
    raw = copy.deepcopy(base)
    searched = {k: _decode(exp, k, v) for k, v in values.items() if not k.startswith("tuner/")}
    for key, value in searched.items():
        _set_path(raw, key, value)
    if "tuner/epochs" in values:  # Hyperband's budget for this trial
        raw["train"]["epochs"] = int(values["tuner/epochs"])
    shorts = _short_keys(list(searched))
    parts = [label] + [f"{shorts[k]}={_slug(_fmt(v))}" for k, v in searched.items()] + [f"seed={seed}"]
    arm_id = ",".join(parts)
    raw.update(arm_id=arm_id, seed=seed, values={**base.get("values", {}), **searched})
    return Arm(id=arm_id, config=ArmConfig(**raw))


def _fmt(v: Any) -> Any:
    return f"{v:.3g}" if isinstance(v, float) else v


def objective_value(summary: dict[str, Any], name: str) -> float | None:
    """The objective from an arm summary (last-epoch metric or probe statistic); None if not finite."""
    key = {"grad_decay_rate": "decay_rate_final"}.get(name, name)
    value = summary.get(key) if key in ("decay_rate_final", "ratio_final") else (summary.get("final") or {}).get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def make_tuner(exp: Experiment, root: Path, base: dict[str, Any], oracle: Any, *, ui: Any = None,
               on_trial: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """A keras-tuner tuner whose trials run :func:`ablations.runner.run_arm` once per execution seed."""
    import keras_tuner as kt

    from ablations.runner import arm_is_current, run_arm

    name, _ = exp.search.objective_spec()
    prune = exp.search.prune

    class SearchTuner(kt.engine.base_tuner.BaseTuner):
        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            values = trial.hyperparameters.values
            scores, summaries = [], []
            for seed in range(exp.search.executions_per_trial):
                arm = trial_arm(exp, base, values, seed=base["seed"] + seed, label=f"trial_{trial.trial_id}")
                arm_dir = root / "arms" / arm.id
                if arm_is_current(arm, arm_dir):
                    summary = store.read_summary(arm_dir)
                else:
                    callbacks = [ui.arm_callback(arm)] if ui else []
                    if prune.vanishing_at_init:
                        callbacks.append(PruneCallback(prune.check_steps, exp.diagnose.model_dump()))
                    summary = run_arm(arm, arm_dir, index=int(trial.trial_id), callbacks=callbacks)
                summaries.append(summary)
                if ui:
                    ui.arm_done(arm, summary, False)
                score = objective_value(summary, name)
                if summary.get("status") != "completed" or score is None:
                    why = summary.get("pruned_reason") or summary.get("error") or \
                        f"{summary.get('status')} at step {summary.get('diverged_at_step')}"
                    record = {"trial": trial.trial_id, "values": values, "status": summary.get("status"),
                              "reason": why, "arms": [s["arm_id"] for s in summaries]}
                    _append_trial(root, record)
                    if on_trial:
                        on_trial(record)
                    raise kt.errors.FailedTrialError(f"{summary.get('status')}: {why}")
                scores.append(score)
            mean = sum(scores) / len(scores)
            record = {"trial": trial.trial_id, "values": values, "status": "completed", name: mean,
                      "arms": [s["arm_id"] for s in summaries]}
            _append_trial(root, record)
            if on_trial:
                on_trial(record)
            return {name: mean}

        def save_model(self, trial_id: str, model: Any, step: int = 0) -> None:
            pass  # each arm folder holds final.keras

    return SearchTuner(oracle=oracle, directory=str(root / TUNER_DIR), project_name="oracle", overwrite=False)


def _append_trial(root: Path, record: dict[str, Any]) -> None:
    """trials.jsonl: one line per finished trial (the report's and the summary table's source)."""
    path = root / "trials.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = [r for r in done if r["trial"] != record["trial"]] + [record]
    store.write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in done))


def read_trials(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def best_trial(trials: list[dict[str, Any]], name: str, direction: str) -> dict[str, Any] | None:
    ok = [t for t in trials if t.get("status") == "completed" and t.get(name) is not None]
    if not ok:
        return None
    return (min if direction == "min" else max)(ok, key=lambda t: t[name])


def best_experiment(exp: Experiment, values: dict[str, Any], point: dict[str, Any] | None = None) -> dict[str, Any]:
    """The experiment (as a dict, without ``search``) with the best values filled in."""
    raw = exp.model_dump(mode="json", exclude={"search"})
    for key, value in values.items():
        if key.startswith("tuner/"):
            continue
        value = _decode(exp, key, value)
        raw["grid"].pop(key, None)
        _set_path(raw, key, value)
    for key, value in (point or {}).items():
        raw["grid"].pop(key, None)
        _set_path(raw, key, value)
    if not raw["grid"]:
        raw.pop("grid")
    return raw


def _point_label(arm_id: str) -> str:
    """The grid point of an arm: its id without the seed (``all`` without a grid)."""
    return ",".join(p for p in arm_id.split(",") if not p.startswith("seed=")) or "all"


def _grid_points(exp: Experiment) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(label, grid values, base arm dict)`` per grid point (first seed), or one point without a grid."""
    points, seen = [], set()
    for arm in exp.arms():
        label = _point_label(arm.id)
        if label in seen:
            continue
        seen.add(label)
        points.append((label, arm.config.values, arm.config.model_dump(mode="json")))
    return points


def run_search(exp: Experiment, out: Path, *, ui: Any = None, console: Any = None) -> dict[str, Any]:
    """Runs the search (resumable); returns ``{"points": [...], "best_yaml": path}``.

    Without ``per_arm`` the grid is ignored for the search (the base config is searched) and ``best.yaml``
    keeps the grid; with ``per_arm`` each grid point gets its own search and ``final/`` runs every grid
    point's seeds with its best values.
    """
    if exp.search is None:
        raise ConfigError("this config has no `search:` section; `ablate tune` needs one (see README, Searching)")
    root = Path(out) / exp.name
    store.check_writable(root)
    name, direction = exp.search.objective_spec()
    results = []
    with store.RunLock(root):
        store.write_text(root / "experiment.yaml", dump_yaml(exp.model_dump(mode="json")))
        if exp.search.per_arm:
            points = _grid_points(exp)
        else:
            base = exp.arms()[0].config.model_dump(mode="json")
            for key in exp.grid:  # the base config, not the first grid point
                _set_path(base, key, _get_path(exp.base_dict(), key))
            base["values"] = {}
            points = [("all", {}, base)]
        for label, point, base in points:
            sroot = root / "search" / (label if exp.search.per_arm else "")
            sroot.mkdir(parents=True, exist_ok=True)
            if console:
                console.print(f"[bold]search[/] {label}: {exp.search.tuner}, objective {name} ({direction}), "
                              f"{exp.search.max_trials} trials", highlight=False)
            oracle = make_oracle(exp, hyperparameters(exp), base["train"]["epochs"])
            tuner = make_tuner(exp, sroot, base, oracle, ui=ui)
            if ui:
                ui.start(exp.search.max_trials * exp.search.executions_per_trial)
            tuner.search(verbose=0)  # the sweep UI reports trials
            if ui:
                ui.stop()
            trials = read_trials(sroot)
            best = best_trial(trials, name, direction)
            results.append({"label": label, "point": point, "root": str(sroot), "trials": trials, "best": best})
        best_yaml = None
        if exp.search.per_arm:
            final = _run_final(exp, root, results, ui)
            best_yaml = root / "best.yaml"
            store.write_text(best_yaml, dump_yaml([best_experiment(exp, r["best"]["values"], r["point"])
                                                   for r in results if r["best"]]))
            return {"points": results, "best_yaml": str(best_yaml), "final": final}
        if results and results[0]["best"]:
            best_yaml = root / "best.yaml"
            store.write_text(best_yaml, dump_yaml(best_experiment(exp, results[0]["best"]["values"])))
    return {"points": results, "best_yaml": str(best_yaml) if best_yaml else None}


def _get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _run_final(exp: Experiment, root: Path, results: list[dict[str, Any]], ui: Any) -> list[dict[str, Any]]:
    """Every grid point's seeds with its best values, into ``root/final`` (a normal run folder)."""
    from ablations.runner import arm_is_current, run_arm

    final_root = root / "final"
    summaries = []
    arms = exp.arms()
    best_by_label = {r["label"]: r["best"] for r in results}
    store.write_text(final_root / "experiment.yaml", dump_yaml(exp.model_dump(mode="json", exclude={"search"})))
    if ui:
        ui.start(len(arms))
    for i, arm in enumerate(arms):
        best = best_by_label.get(_point_label(arm.id))
        if best is None:
            continue
        raw = arm.config.model_dump(mode="json")
        for key, value in best["values"].items():
            if not key.startswith("tuner/"):
                _set_path(raw, key, _decode(exp, key, value))
        tuned = Arm(id=arm.id, config=ArmConfig(**raw))
        arm_dir = final_root / "arms" / arm.id
        summary = store.read_summary(arm_dir) if arm_is_current(tuned, arm_dir) else \
            run_arm(tuned, arm_dir, index=i, callbacks=[ui.arm_callback(tuned)] if ui else [])
        summary["tuned"] = {k: v for k, v in best["values"].items() if not k.startswith("tuner/")}
        summaries.append(summary)
        if ui:
            ui.arm_done(tuned, summary, False)
    if ui:
        ui.stop()
    return summaries


def PruneCallback(check_steps: int, thresholds: dict[str, float]) -> Any:  # noqa: N802 - a Keras callback factory
    """A Keras callback that stops an arm whose first ``check_steps`` captured steps show a vanishing verdict.

    It drains the probe's buffer once (a single host read, after ``check_steps`` captures), judges the tables
    with :func:`ablations.diagnose.verdicts` (``at_init=True``) and sets ``model.stop_reason``.
    """
    import keras

    from ablations.diagnose import verdicts

    class _Prune(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.done = False
            self.epoch = 0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            steps = self.epoch * (self.params.get("steps") or 0) + batch + 1
            if self.done or steps < check_steps * getattr(self.model, "every", 1):
                return
            self.done = True
            drain = getattr(self.model, "drain_callback", None)
            if drain is None:
                return
            drain.drain()
            tables = drain.tables(self.model)
            found = [v for v in verdicts(tables["params"], tables["blocks"], tables["history"], thresholds,
                                         at_init=True) if v["kind"] == "vanishing"]
            if found:
                object.__setattr__(self.model, "stop_reason", f"vanishing at init: {found[0]['message']}")
                self.model.stop_training = True

    return _Prune()


def tuning_table(exp: Experiment, point: dict[str, Any], top: int = 10) -> Any:
    """A rich table of the best trials of one search (completed first, then pruned/failed with reasons)."""
    from rich.table import Table

    name, direction = exp.search.objective_spec()
    trials = point["trials"]
    ok = sorted([t for t in trials if t.get("status") == "completed"], key=lambda t: t[name],
                reverse=direction == "max")
    rest = [t for t in trials if t.get("status") != "completed"]
    keys = list(exp.search.space)
    t = Table(title=f"search {point['label']}: {len(ok)} completed, {len(rest)} pruned/failed of {len(trials)} trials")
    for col in ["trial", *keys, name, "status"]:
        t.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for tr in ok[:top] + rest:
        vals = [str(_fmt(_decode(exp, k, tr["values"].get(k)))) for k in keys]
        score = f"{tr[name]:.4g}" if tr.get(name) is not None else "-"
        status = tr["status"] if tr["status"] == "completed" else f"{tr['status']}: {tr.get('reason', '')}"
        t.add_row(str(tr["trial"]), *vals, score, status)
    return t
