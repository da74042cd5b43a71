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

Layout: ``runs/<name>/search[/<grid point>]/`` holds the trials' arm folders (``arms/trial_0003,...``), one
record per finished trial (``trials/<trial id>.json``, written whole by whichever process ran the trial,
through :func:`ablations.store.write_trial`) and keras-tuner's oracle state (``.tuner/oracle``), so a killed
search resumes without redoing finished trials; ``best.yaml`` is the experiment with the best values filled
in, runnable by ``ablate run`` (with ``per_arm``: the grid kept, each grid point's best values as a
``per_point`` entry; ``final/`` is that experiment's run folder).

Scaling out uses the sweep engine's chief/worker machinery (:func:`ablations.distributed.serve_oracle`):
``ablate tune CONFIG --workers N`` makes this process the chief: it holds the run-folder lock, serves each
search's oracle (the stateful random/bayesian/hyperband/grid oracle, reloaded from ``.tuner/oracle``, so a
killed chief resumes too) and starts N local workers (``ablate tune <run>/experiment.yaml --point LABEL``),
which run trials with the same :class:`SearchTuner` ``run_trial`` and write into the shared run folder. With
``per_arm`` the grid points are searched one after another (fresh workers for each); ``final/`` runs in the
chief. The chief announces in the served space which search it serves (``gradzoo/point``), its config digest
and whether it is the last one, so workers started by hand with the ``KERASTUNER_*`` variables (see
:mod:`ablations.sweep`) join whichever grid point is being searched, and go on to the next ones::

    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=0.0.0.0 KERASTUNER_ORACLE_PORT=8470 \\
        ablate tune CONFIG --out /shared/runs [--workers N]
    KERASTUNER_TUNER_ID=worker-$(hostname) KERASTUNER_ORACLE_IP=<chief host> KERASTUNER_ORACLE_PORT=8470 \\
        ablate tune CONFIG --out /shared/runs
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from ablations import compat, store
from ablations.config import (Arm, ArmConfig, ConfigError, DataConfig, Experiment, RuntimeConfig, dump_yaml,
                               parse_experiment, set_path, short_keys, slug)

TUNER_DIR = ".tuner"
POINT, CONFIG, LAST = "gradzoo/point", "gradzoo/config", "gradzoo/last"  # what the chief announces to workers
NEXT_POINT_WAIT_S = 120.0  # how long a worker started by hand waits for the chief's next grid point


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


def load_oracle(exp: Experiment, sroot: Path, max_epochs: int) -> Any:
    """The search's oracle with its state in ``sroot/.tuner/oracle``, reloaded when a search ran there before.

    Reloading here, not through a tuner, lets any process (single, or a chief, whatever its tuner id) resume
    the oracle that any other saved; trials that were running are handed out again first.
    """
    oracle = make_oracle(exp, hyperparameters(exp), max_epochs)
    oracle.verbose = 0  # the sweep UI reports trials
    compat.set_oracle_dir(oracle, str(sroot / TUNER_DIR), "oracle")
    if (sroot / TUNER_DIR / "oracle" / "oracle.json").exists():
        oracle.reload()
    return oracle


def _finished(oracle: Any) -> bool:
    """Whether a reloaded oracle has nothing left to hand out (known without asking it for a trial)."""
    return bool(oracle.max_trials) and len(oracle.trials) >= oracle.max_trials and not compat.oracle_retry_queue(oracle) \
        and not oracle.ongoing_trials


def trial_arm(exp: Experiment, base: dict[str, Any], values: dict[str, Any], seed: int, label: str) -> Arm:
    """The arm of one trial execution: ``base`` (a resolved arm dict) with the trial's values filled in."""
    raw = copy.deepcopy(base)
    searched = {k: _decode(exp, k, v) for k, v in values.items() if not k.startswith("tuner/")}
    for key, value in searched.items():
        set_path(raw, key, value)
    if "tuner/epochs" in values:  # Hyperband's budget for this trial
        raw["train"]["epochs"] = int(values["tuner/epochs"])
    shorts = short_keys(list(searched))
    parts = [label] + [f"{shorts[k]}={slug(_fmt(v))}" for k, v in searched.items()] + [f"seed={seed}"]
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
               on_trial: Callable[[dict[str, Any]], None] | None = None, project: str = "oracle") -> Any:
    """A keras-tuner tuner whose trials run :func:`ablations.runner.run_arm` once per execution seed.

    Args:
        exp: the experiment (its ``search`` section).
        root: the search root (``runs/<name>/search[/<point>]``): arm folders and trial records.
        base: the resolved arm dict the trial's values are filled into.
        oracle: from :func:`load_oracle` (keras-tuner swaps in a gRPC client on a worker).
        ui, on_trial: progress display, and a callback with each trial's record.
        project: keras-tuner's project folder in ``root/.tuner`` (workers get their own, recreated).
    """
    import keras_tuner as kt

    from ablations.distributed import search_loop

    def finish(record: dict[str, Any]) -> None:
        store.write_trial(root, record)
        if on_trial:
            on_trial(record)

    class SearchTuner(kt.engine.base_tuner.BaseTuner):
        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            return run_trial(exp, root, base, trial, ui, finish)

        def search(self, *args: Any, **kwargs: Any) -> None:
            search_loop(self)

        def reload(self) -> None:
            pass  # load_oracle reloaded the oracle (the tuner itself has no state)

        def save_model(self, trial_id: str, model: Any, step: int = 0) -> None:
            pass  # each arm folder holds final.keras

    worker = project != "oracle"
    return SearchTuner(oracle=oracle, directory=str(root / TUNER_DIR), project_name=project, overwrite=worker)


def run_trial(exp: Experiment, root: Path, base: dict[str, Any], trial: Any, ui: Any,
              finish: Callable[[dict[str, Any]], None]) -> dict[str, float]:
    """One trial: its executions (one arm per seed, skipped when already done), then its record.

    Returns ``{objective: mean over the executions}``; raises keras-tuner's ``FailedTrialError`` (after
    recording why) when an execution did not complete or has no objective value.
    """
    import keras_tuner as kt

    from ablations.runner import run_arm

    name, _ = exp.search.objective_spec()
    prune = exp.search.prune
    values = trial.hyperparameters.values
    scores, summaries = [], []
    for seed in range(exp.search.executions_per_trial):
        arm = trial_arm(exp, base, values, seed=base["seed"] + seed, label=f"trial_{trial.trial_id}")
        arm_dir = root / "arms" / arm.id
        if store.is_current(arm_dir, arm.config.model_dump(mode="json")):
            summary = store.read_summary(arm_dir)
        else:
            callbacks = [ui.arm_callback(arm)] if ui else []
            if prune.vanishing_at_init:
                callbacks.append(pruning(prune.check_steps, exp.diagnose.model_dump()))
            summary = run_arm(arm, arm_dir, index=int(trial.trial_id), callbacks=callbacks)
        summaries.append(summary)
        if ui:
            ui.arm_done(arm, summary, False)
        score = objective_value(summary, name)
        if summary.get("status") != "completed" or score is None:
            why = summary.get("pruned_reason") or summary.get("error") or \
                f"{summary.get('status')} at step {summary.get('diverged_at_step')}"
            finish({"trial": trial.trial_id, "values": values, "status": summary.get("status"),
                    "reason": why, "arms": [s["arm_id"] for s in summaries]})
            raise kt.errors.FailedTrialError(f"{summary.get('status')}: {why}")
        scores.append(score)
    mean = sum(scores) / len(scores)
    finish({"trial": trial.trial_id, "values": values, "status": "completed", name: mean,
            "arms": [s["arm_id"] for s in summaries]})
    return {name: mean}


def best_trial(trials: list[dict[str, Any]], name: str, direction: str) -> dict[str, Any] | None:
    ok = [t for t in trials if t.get("status") == "completed" and t.get(name) is not None]
    if not ok:
        return None
    return (min if direction == "min" else max)(ok, key=lambda t: t[name])


def _searched(exp: Experiment, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's values without keras-tuner's own (``tuner/epochs``...), choices decoded."""
    return {k: _decode(exp, k, v) for k, v in values.items() if not k.startswith("tuner/")}


def best_experiment(exp: Experiment, values: dict[str, Any]) -> dict[str, Any]:
    """The experiment (as a dict, without ``search``) with the best values filled in (a searched key that
    is also a grid axis is pinned)."""
    raw = exp.model_dump(mode="json", exclude={"search"})
    for key, value in _searched(exp, values).items():
        raw["grid"].pop(key, None)
        set_path(raw, key, value)
    if not raw["grid"]:
        raw.pop("grid")
    return raw


def best_per_point(exp: Experiment, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The experiment (without ``search``) whose grid points each run with their own best values: the grid
    as it is, plus a ``per_point`` entry per grid point that has a best trial (the others keep the base
    values). ``ablate run`` on it trains what ``final/`` holds."""
    raw = exp.model_dump(mode="json", exclude={"search"})
    raw["per_point"] = list(raw.get("per_point") or []) + [
        {"point": r["point"], "set": _searched(exp, r["best"]["values"])} for r in results if r["best"]]
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


def _search_points(exp: Experiment) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(label, grid values, base arm dict)`` of every search: one per grid point with ``per_arm``, else one
    over the base config (the grid is ignored for the search)."""
    if exp.search.per_arm:
        return _grid_points(exp)
    base = exp.arms()[0].config.model_dump(mode="json")
    for key in exp.grid:  # the base config, not the first grid point
        set_path(base, key, _get_path(exp.base_dict(), key))
    base["values"] = {}
    return [("all", {}, base)]


def _search_root(root: Path, exp: Experiment, label: str) -> Path:
    return root / "search" / (label if exp.search.per_arm else "")


def run_search(exp: Experiment, out: Path, *, ui: Any = None, console: Any = None, workers: int = 0,
               point: str | None = None) -> dict[str, Any]:
    """Runs the search (resumable); returns ``{"points": [...], "best_yaml": path}``.

    Without ``per_arm`` the grid is ignored for the search (the base config is searched) and ``best.yaml``
    keeps the grid; with ``per_arm`` each grid point gets its own search and ``final/`` runs every grid
    point's seeds with its best values.

    Args:
        exp: the experiment, with a ``search`` section.
        out: parent of the run folder.
        ui, console: progress display and console (optional).
        workers: local worker processes; more than 0 makes this process the chief (module docstring).
        point: on a local worker, the label of the one search its chief started it for.

    Returns:
        The searches' results; on a worker (``KERASTUNER_*`` variables) ``{"worker": id, "trials": [...]}``
        with the records of the trials it ran.

    Raises:
        SweepError: bad worker setup, or every local worker exited before a search ended.
    """
    if exp.search is None:
        raise ConfigError("this config has no `search:` section; `ablate tune` needs one (see README, Searching)")
    from ablations.distributed import SweepError, process_role
    from ablations.preflight import check_data, check_devices

    role = process_role(workers)
    root = Path(out) / exp.name
    points = _search_points(exp)
    if role == "worker":
        return join_search(exp, root, points, point=point, console=console)
    if point is not None:
        raise SweepError("--point is for the local workers a chief starts; leave it out")
    store.check_writable(root)
    with store.RunLock(root):
        check_data((label, DataConfig(**base["data"]), base["train"]["loss"]) for label, _, base in points)
        if role == "local":  # a chief only serves: its workers claim the devices
            check_devices((label, RuntimeConfig(**base["runtime"])) for label, _, base in points)
        store.write_text(root / "experiment.yaml", dump_yaml(exp.model_dump(mode="json")))
        results = [_search_point(exp, root, label, values, base, workers=workers if role == "chief" else None,
                                 last=i == len(points) - 1, ui=ui, console=console)
                   for i, (label, values, base) in enumerate(points)]
        best_yaml = None
        if exp.search.per_arm:
            best = best_per_point(exp, results)
            best_yaml = root / "best.yaml"
            store.write_text(best_yaml, dump_yaml(best))
            final = _run_final(parse_experiment(best, source=str(best_yaml)), root, results, ui)
            return {"points": results, "best_yaml": str(best_yaml), "final": final}
        if results and results[0]["best"]:
            best_yaml = root / "best.yaml"
            store.write_text(best_yaml, dump_yaml(best_experiment(exp, results[0]["best"]["values"])))
    return {"points": results, "best_yaml": str(best_yaml) if best_yaml else None}


def _search_point(exp: Experiment, root: Path, label: str, values: dict[str, Any], base: dict[str, Any], *,
                  workers: int | None, last: bool, ui: Any, console: Any) -> dict[str, Any]:
    """One search (one grid point with ``per_arm``): run or resume it, then its trials and best trial."""
    name, direction = exp.search.objective_spec()
    if console:
        console.print(f"[bold]search[/] {label}: {exp.search.tuner}, objective {name} ({direction}), "
                      f"{exp.search.max_trials} trials", highlight=False)
    sroot = _search_root(root, exp, label)
    _search_one(exp, root, sroot, label, base, workers=workers, last=last, ui=ui)
    trials = store.read_trials(sroot)
    return {"label": label, "point": values, "root": str(sroot), "trials": trials,
            "best": best_trial(trials, name, direction)}


def _search_one(exp: Experiment, root: Path, sroot: Path, label: str, base: dict[str, Any], *,
                workers: int | None, last: bool, ui: Any) -> None:
    """One search, resumed from its oracle's state: in this process (``workers`` None) or served to workers.

    Raises:
        SweepError: every local worker exited before the search ended.
    """
    from ablations.distributed import SweepError

    sroot.mkdir(parents=True, exist_ok=True)
    oracle = load_oracle(exp, sroot, base["train"]["epochs"])
    if ui:
        ui.start(exp.search.max_trials * exp.search.executions_per_trial)
    try:
        if workers is None:
            make_tuner(exp, sroot, base, oracle, ui=ui).search()
        elif not _serve_search(exp, root, sroot, label, oracle, workers=workers, last=last, ui=ui):
            raise SweepError(f"every local worker exited before search {label} ended; see their logs in "
                             f"{sroot / TUNER_DIR}; rerun to resume")
    finally:
        if ui:
            ui.stop()


# ------------------------------------------------------------------------------------------ chief/worker


def _serve_search(exp: Experiment, root: Path, sroot: Path, label: str, oracle: Any, *, workers: int, last: bool,
                  ui: Any) -> bool:
    """The chief's part of one search: serves its oracle to ``workers`` local workers (and any started by
    hand) and shows trials as they end. Returns False when every local worker exited before the end."""
    from ablations.distributed import serve_oracle
    from ablations.sweep import config_digest

    if _finished(oracle):  # resumed after the end: no worker needs to start
        return True
    facts = {POINT: label, CONFIG: config_digest(exp), LAST: "yes" if last else "no"}
    cmd = [sys.executable, "-m", "ablations", "tune", str(root / "experiment.yaml"), "--out", str(root.parent),
           "--no-report", "--point", label]
    ended = serve_oracle(oracle, command=cmd, workers=workers, logs=sroot / TUNER_DIR, facts=facts,
                         on_end=lambda trial: _show_trial(sroot, _ended_record(sroot, trial), ui))
    # keras-tuner's end_trial saves before it drops the trial from the running ones (a tuner saves again after
    # it): without this save a resume would hand the last trial out again.
    oracle.save()
    return ended


def _ended_record(sroot: Path, trial: Any) -> dict[str, Any]:
    """The record of a trial that ended on a worker. The chief writes it for a trial that failed without one
    (its worker died mid-trial, or raised), so that every trial the oracle ended has a record."""
    import keras_tuner as kt

    try:
        return json.loads((sroot / store.TRIALS_DIR / f"{trial.trial_id}.json").read_text())
    except (OSError, ValueError):
        pass
    record = {"trial": trial.trial_id, "values": trial.hyperparameters.values, "status": "failed",
              "reason": ((trial.message or "").strip().splitlines() or ["the worker wrote no record"])[-1],
              "arms": []}
    # A completed trial whose record is missing is a slow shared file system: never overwrite the worker's.
    if trial.status != kt.engine.trial.TrialStatus.COMPLETED:
        store.write_trial(sroot, record)
    return record


def _show_trial(sroot: Path, record: dict[str, Any], ui: Any) -> None:
    if not ui:
        return
    for arm_id in record.get("arms") or [f"trial_{record['trial']}"]:
        summary = store.read_summary(sroot / "arms" / arm_id) or {"status": record["status"],
                                                                  "error": record.get("reason")}
        ui.arm_done(SimpleNamespace(id=arm_id), summary, False)


def join_search(exp: Experiment, root: Path, points: list[tuple[str, dict[str, Any], dict[str, Any]]], *,
                point: str | None = None, console: Any = None) -> dict[str, Any]:
    """Worker: runs trials of the search the chief announces, into the shared run folder (no lock).

    A local worker (``point`` given) serves that one search; one started by hand goes on with the chief's
    next grid point until the chief announces its last one, or announces none for a while.
    """

    from ablations.sweep import config_digest

    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    bases = {label: base for label, _, base in points}
    digest = config_digest(exp)
    records: list[dict[str, Any]] = []

    def done(record: dict[str, Any]) -> None:
        records.append(record)
        if console:
            console.print(f"{record['status']:9} trial {record['trial']} {record.get('reason', '')}", highlight=False)

    client = compat.oracle_client(make_oracle(exp, hyperparameters(exp), 1))
    facts: dict[str, Any] | None = client.get_space().values  # waits for the chief (keras-tuner: up to an hour)
    while facts is not None:
        label = _check_facts(facts, digest, bases, point)
        base = bases[label]
        oracle = make_oracle(exp, hyperparameters(exp), base["train"]["epochs"])
        make_tuner(exp, _search_root(root, exp, label), base, oracle, on_trial=done,
                   project=f"worker_{tuner_id}").search()
        if point is not None or facts.get(LAST) == "yes":
            break
        facts = _next_point(client, label)
    return {"worker": tuner_id, "trials": records}


def _check_facts(facts: dict[str, Any], digest: str, bases: dict[str, Any], point: str | None) -> str:
    """The label of the search the chief serves, after checking this worker can run it."""
    from ablations.distributed import SweepError

    if CONFIG not in facts:
        raise SweepError("the chief is not an `ablate tune` chief (it announces no search); start workers with the "
                         "chief's command")
    if facts[CONFIG] != digest:
        raise SweepError(f"this worker's config differs from the chief's (digest {digest} vs {facts[CONFIG]}); "
                         f"start workers with the chief's CONFIG and --set options")
    label = facts.get(POINT)
    if label not in bases or (point is not None and label != point):
        raise SweepError(f"the chief serves search {label!r}, which this worker was not started for "
                         f"({point or ', '.join(bases)})")
    return label


def _next_point(client: Any, label: str, wait_s: float = NEXT_POINT_WAIT_S) -> dict[str, Any] | None:
    """The chief's announcement once it serves a search other than ``label``; None if none comes in ``wait_s``
    (the chief ended, or went on to ``final/``)."""
    import grpc
    import keras_tuner as kt

    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:  # keras-tuner's own client would wait an hour for a chief that is gone
            response = compat.get_space_with_timeout(client, timeout=max(0.1, deadline - time.time()))
        except grpc.RpcError:
            return None
        values = kt.HyperParameters.from_proto(response.hyperparameters).values
        if values.get(POINT) != label:
            return values
        time.sleep(1.0)  # the chief still serves the search this worker finished
    return None


def _get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _run_final(best: Experiment, root: Path, results: list[dict[str, Any]], ui: Any) -> list[dict[str, Any]]:
    """The seeds of every grid point that has a best trial, at its best values (``best`` is the experiment
    of :func:`best_per_point`), into ``root/final`` (a normal run folder whose experiment.yaml is ``best``)."""
    from ablations.runner import run_arm

    final_root = root / "final"
    tuned = {r["label"]: r["best"]["values"] for r in results if r["best"]}
    arms = best.arms()
    store.write_text(final_root / "experiment.yaml", dump_yaml(best.model_dump(mode="json")))
    summaries = []
    if ui:
        ui.start(len(arms))
    for i, arm in enumerate(arms):
        values = tuned.get(_point_label(arm.id))
        if values is None:  # every trial of this grid point was pruned or failed: nothing to run it at
            continue
        arm_dir = final_root / "arms" / arm.id
        summary = store.read_summary(arm_dir) if store.is_current(arm_dir, arm.config.model_dump(mode="json")) \
            else run_arm(arm, arm_dir, index=i, callbacks=[ui.arm_callback(arm)] if ui else [])
        summary["tuned"] = {k: v for k, v in values.items() if not k.startswith("tuner/")}
        summaries.append(summary)
        if ui:
            ui.arm_done(arm, summary, False)
    if ui:
        ui.stop()
    return summaries


def pruning(check_steps: int, thresholds: dict[str, float]) -> Callable[[Any], Any]:
    """A factory ``fn(drain) -> keras callback`` (:func:`ablations.runner.run_arm` calls it with the probe's
    drain) that stops an arm whose first ``check_steps`` captured steps show a vanishing verdict.

    The callback drains the probe's buffer once (a single host read, after ``check_steps`` captures), judges
    the tables with :func:`ablations.diagnose.verdicts` (``at_init=True``) and sets its ``stop_reason``.
    """
    import keras

    from ablations.diagnose import verdicts

    class Prune(keras.callbacks.Callback):
        def __init__(self, drain: Any) -> None:
            super().__init__()
            self.drain, self.done, self.epoch = drain, False, 0
            self.stop_reason: str | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            steps = self.epoch * (self.params.get("steps") or 0) + batch + 1
            if self.done or steps < check_steps * getattr(self.model, "every", 1):
                return
            self.done = True
            self.drain.drain()
            tables = self.drain.tables(self.model)
            found = [v for v in verdicts(tables["params"], tables["blocks"], tables["history"], thresholds,
                                         at_init=True) if v["kind"] == "vanishing"]
            if found:
                self.stop_reason = f"vanishing at init: {found[0]['message']}"
                self.model.stop_training = True

    return Prune


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
