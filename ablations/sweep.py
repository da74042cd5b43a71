"""The sweep engine: every arm is a keras-tuner trial, run by :func:`ablations.runner.run_arm`.

One engine for one process, many local processes and many machines:

* in-process (``ablate run CONFIG``): a keras-tuner oracle hands this process the pending arms one by one;
* chief + workers (``ablate run CONFIG --workers N``, or the ``KERASTUNER_*`` variables): the chief holds the
  run-folder lock and serves the oracle over gRPC (keras-tuner's own service); each worker asks it for the
  next arm, trains it into the shared run folder and reports back. Workers never take the lock.

The chief/worker machinery (:mod:`ablations.distributed`: :func:`process_role`, :func:`serve_oracle`,
:func:`search_loop`) knows nothing about arms: ``ablate tune --workers N`` (:mod:`ablations.tune`) serves its
search oracle through it too.
:func:`serve_oracle` serves any oracle, starts the local workers (their command line is the caller's), calls
back for every trial that ends, fails the trial of a local worker that died, and returns when the oracle has
told a worker to stop and no trial is running (or when the caller says so).

The run folder is the source of truth (ARCHITECTURE.md section 3): keras-tuner's files live in
``runs/<exp>/.tuner/`` and are recreated on every start, so a sweep killed at any moment resumes from what
the run folder holds (an arm is done when :func:`ablations.store.is_current` finds an undamaged result for
the same config). Before training, :mod:`ablations.preflight` opens every dataset once (bad data stops the
sweep before any arm), and the sweep says which finished arms it trains again and why (config changed,
damaged). An arm folder trained again is first moved to ``runs/<exp>/.replaced/<arm_id>``, so files of the
old result never mix with the new one.

Started by hand on other machines (the run folder on a shared file system)::

    # chief (holds the lock, serves the oracle; add --workers N to also train here)
    KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=0.0.0.0 KERASTUNER_ORACLE_PORT=8470 \\
        ablate run CONFIG --out /shared/runs
    # each worker, any number, any time
    KERASTUNER_TUNER_ID=worker-$(hostname) KERASTUNER_ORACLE_IP=<chief host> KERASTUNER_ORACLE_PORT=8470 \\
        ablate run CONFIG --out /shared/runs

``ablate tune CONFIG`` works the same way with these variables (workers learn from the chief which search, or
which grid point of a ``per_arm`` search, it is serving; see :mod:`ablations.tune`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from ablations import checkpoint, compat, store
from ablations.config import Arm, Experiment, dump_yaml
from ablations.distributed import (SweepError, free_port, process_role, search_loop,  # noqa: F401 - re-exported
                                   serve_oracle, worker_env)
from ablations.preflight import check_inputs
from ablations.runner import run_arm

TUNER_DIR = ".tuner"  # keras-tuner's project files and local worker logs, inside the run folder
REPLACED_DIR = ".replaced"  # the previous folder of each arm trained again (one generation kept)
MULTI_WORKER_DIR = ".multi_worker"  # outputs of non-chief multi_worker processes (the chief's go to arms/)
STATUS_CODE = {"completed": 0, "diverged": 1, "failed": 2}


def config_digest(exp: Experiment) -> str:
    """A short hash of the resolved experiment: chief and workers must agree on it."""
    return hashlib.sha1(dump_yaml(exp.model_dump(mode="json")).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- keras-tuner


def _kt():
    import keras_tuner as kt

    return kt


def make_oracle(arms: list[Arm], digest: str, project_dir: Path | None = None) -> Any:
    """A GridSearch oracle over the pending arms (one Choice hyperparameter: the arm id).

    Args:
        arms: the arms still to run.
        digest: :func:`config_digest` of the experiment, a fixed hyperparameter workers check.
        project_dir: where the oracle saves its state (a tuner sets it otherwise).
    """
    kt = _kt()

    class ArmOracle(kt.oracles.GridSearchOracle):
        """GridSearch that hands out every not-yet-started arm in order to whichever worker asks.

        Stock GridSearch derives each new combination from a *finished* trial, so with one hyperparameter
        it keeps at most about one worker busy; arms are independent, so any idle worker may take the next.
        """

        def populate_space(self, trial_id: str) -> dict[str, Any]:
            started = {t.hyperparameters.values.get("arm") for t in self.trials.values()}
            arm_hp = next(h for h in self.hyperparameters.space if h.name == "arm")
            for arm_id in arm_hp.values:
                if arm_id not in started:
                    return {"status": kt.engine.trial.TrialStatus.RUNNING,
                            "values": {"arm": arm_id, "config": digest}}
            if self.ongoing_trials:
                return {"status": kt.engine.trial.TrialStatus.IDLE, "values": None}
            return {"status": kt.engine.trial.TrialStatus.STOPPED, "values": None}

    hp = kt.HyperParameters()
    hp.Choice("arm", [a.id for a in arms], ordered=False)
    hp.Fixed("config", digest)
    oracle = ArmOracle(objective=kt.Objective("loss", "min"), max_trials=len(arms), hyperparameters=hp,
                       tune_new_entries=False, allow_new_entries=False,
                       max_consecutive_failed_trials=len(arms) + 1)  # a failed arm never stops the sweep
    oracle.verbose = 0  # the sweep UI reports arms
    if project_dir is not None:
        compat.set_oracle_dir(oracle, str(project_dir.parent), project_dir.name)
    return oracle


def make_tuner(oracle: Any, arms: list[Arm], root: Path, *, out_root: Path | None = None, ui: Any = None,
               on_arm: Callable[[Arm, dict[str, Any], bool], None] | None = None, digest: str = "",
               project: str = "oracle", tuner_dir: Path | None = None) -> Any:
    """A keras-tuner tuner whose ``run_trial`` is :func:`ablations.runner.run_arm`.

    Args:
        oracle: the oracle (a local one; keras-tuner swaps in a gRPC client on workers).
        arms: all arms of the experiment, in order (trials name them by id).
        root: the run folder (decides what is done).
        out_root: where this process writes arm folders (default ``root``; non-chief multi_worker
            processes write elsewhere).
        ui, on_arm: progress display and per-arm callback.
        digest: :func:`config_digest` of this process's experiment (checked against the chief's).
        project: keras-tuner project name (recreated at each start: the run folder decides).
        tuner_dir: keras-tuner's folder (default ``root/.tuner``).
    """
    kt = _kt()

    class ArmTuner(kt.engine.base_tuner.BaseTuner):
        """Trial = arm: ``run_trial`` trains the arm named by the trial's ``arm`` hyperparameter."""

        def __init__(self) -> None:
            super().__init__(oracle=oracle, directory=str(tuner_dir or root / TUNER_DIR), project_name=project,
                             overwrite=True)
            self.by_id = {a.id: (i, a) for i, a in enumerate(arms)}
            self.results: list[dict[str, Any]] = []
            self.fatal: store.StoreError | None = None  # the run folder cannot be written: stop the sweep

        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            index, arm = arm_for_trial(trial, self.by_id, digest)
            try:
                summary, skipped = run_one(arm, index, root, out_root or root, ui)
            except store.StoreError as err:  # disk full, folder gone: every later arm would fail the same way
                self.fatal = err
                raise kt.errors.FatalError(str(err)) from None
            self.results.append(summary)
            if ui and (out_root or root) == root:
                ui.arm_done(arm, summary, skipped)
            if on_arm:
                on_arm(arm, summary, skipped)
            return trial_metrics(summary)

        def search(self, *args: Any, **kwargs: Any) -> None:
            try:
                search_loop(self)
            except kt.errors.FatalError:
                if self.fatal is not None:
                    raise self.fatal from None
                raise

        def save_model(self, trial_id: str, model: Any, step: int = 0) -> None:
            pass  # the arm's folder holds final.keras

    return ArmTuner()


def arm_for_trial(trial: Any, by_id: dict[str, tuple[int, Arm]], digest: str) -> tuple[int, Arm]:
    """``(index, arm)`` named by a trial, after checking the chief's config is this process's."""
    kt = _kt()
    values = trial.hyperparameters.values
    if digest and values.get("config") not in (None, digest):
        raise kt.errors.FatalError(
            f"this worker's config differs from the chief's (digest {digest} vs {values.get('config')}); "
            f"start workers with the same CONFIG and --set options as the chief")
    if values.get("arm") not in by_id:
        raise kt.errors.FatalError(f"the chief asked for arm {values.get('arm')!r}, which this worker's "
                                   f"config does not have; start workers with the chief's CONFIG")
    return by_id[values["arm"]]


def trial_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """What the oracle records of an arm: its final loss and status."""
    loss = (summary.get("final") or {}).get("loss")
    return {"loss": float(loss) if loss is not None else float("inf"),
            "status_code": float(STATUS_CODE.get(summary.get("status"), 2))}


def is_current(arm: Arm, arm_dir: Path) -> bool:
    """Whether ``arm_dir`` holds an undamaged result of exactly this arm's config."""
    return store.is_current(arm_dir, arm.config.model_dump(mode="json"))


def run_one(arm: Arm, index: int, root: Path, out_root: Path, ui: Any) -> tuple[dict[str, Any], bool]:
    """Runs one arm unless the run folder already has its result; returns ``(summary, skipped)``.

    ``root`` decides what is done; the arm is written under ``out_root`` (``root`` except on non-chief
    multi_worker processes). An earlier folder of the arm (another config, damaged, interrupted without a
    checkpoint) is moved to ``root/.replaced/<arm_id>`` first, so none of its files is read as part of the new
    result; an interrupted arm with a checkpoint of this config stays and continues from it.
    """
    arm_dir = root / "arms" / arm.id
    if is_current(arm, arm_dir):  # done earlier, or by another worker
        return store.read_summary(arm_dir), True
    out_dir = out_root / "arms" / arm.id
    if out_root == root and not checkpoint.resumable(out_dir, arm.config.model_dump(mode="json")):
        _set_aside(out_dir, root / REPLACED_DIR / arm.id)  # an interrupted arm with its checkpoint stays
    for tmp in list(out_dir.glob(".*.tmp*")):  # a killed attempt's partial writes, never read
        tmp.unlink(missing_ok=True)
    callbacks = [ui.arm_callback(arm)] if ui and out_root == root else []
    return run_arm(arm, out_dir, index=index, callbacks=callbacks), False


def _set_aside(arm_dir: Path, dest: Path) -> None:
    if not arm_dir.is_dir() or not any(p for p in arm_dir.iterdir() if ".tmp" not in p.name):
        return
    try:
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(arm_dir, dest)
    except OSError as err:
        raise store.StoreError(f"cannot move the earlier folder of arm {arm_dir.name} aside to {dest}: "
                               f"{err.strerror}") from None


# ----------------------------------------------------------------------------------------------- modes


def run_sweep(exp: Experiment, out: Path, *, ui: Any = None, workers: int = 0,
              on_arm: Callable[[Arm, dict[str, Any], bool], None] | None = None) -> list[dict[str, Any]]:
    """Runs every pending arm of ``exp`` into ``out/<name>``; returns the summaries in arm order.

    The mode follows the ``KERASTUNER_*`` variables: none set (and ``workers == 0``) runs in this process;
    ``workers > 0`` or ``KERASTUNER_TUNER_ID=chief...`` serves the oracle and starts ``workers`` local
    worker processes; any other ``KERASTUNER_TUNER_ID`` joins the chief as a worker (no lock).
    """
    from ablations.strategy import configure_devices

    root = Path(out) / exp.name
    arms = exp.arms()
    _configure_process(arms, configure_devices)
    multi_worker = any(a.config.runtime.strategy == "multi_worker" for a in arms)
    if multi_worker and (workers or os.environ.get("KERASTUNER_ORACLE_IP")):
        raise SweepError("runtime.strategy multi_worker runs every arm on all $TF_CONFIG workers together; "
                         "it cannot be combined with --workers or KERASTUNER_* (start one `ablate run` per "
                         "TF_CONFIG worker instead)")
    role = process_role(workers)
    if role == "worker":
        return join_chief(exp, root, arms, ui=ui, on_arm=on_arm)
    if multi_worker:
        from ablations.strategy import is_chief, parse_tf_config

        cfg = parse_tf_config()
        if not is_chief(cfg):
            scratch = root / MULTI_WORKER_DIR / f"{cfg['task']['type']}-{cfg['task']['index']}"
            return _run_local(exp, root, arms, ui=None, on_arm=on_arm, out_root=scratch, lock=False)
    if role == "chief":
        return serve_chief(exp, root, arms, workers=workers, ui=ui, on_arm=on_arm)
    return _run_local(exp, root, arms, ui=ui, on_arm=on_arm)


def worker_role(exp: Experiment) -> str | None:
    """This process's name when it only helps another (a keras-tuner worker, a non-chief multi_worker
    process): it then neither prints the sweep's table nor writes the report. ``None`` for the main process."""
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "")
    if os.environ.get("KERASTUNER_ORACLE_IP") and "chief" not in tuner_id:
        return f"worker {tuner_id}"
    if any(a.config.runtime.strategy == "multi_worker" for a in exp.arms()):
        from ablations.strategy import is_chief, parse_tf_config

        cfg = parse_tf_config()
        if not is_chief(cfg):
            return f"multi_worker {cfg['task']['type']}-{cfg['task']['index']}"
    return None


def _configure_process(arms: list[Arm], configure_devices: Callable) -> None:
    counts = {a.config.runtime.logical_cpus for a in arms}
    if len(counts) > 1:
        raise SweepError(f"runtime.logical_cpus differs between arms ({sorted(map(str, counts))}); it is fixed "
                         f"per process, so every arm must use the same value")
    configure_devices(arms[0].config.runtime)


def _pending(arms: list[Arm], root: Path, ui: Any = None) -> list[Arm]:
    """The arms without a current result; says (on ``ui``) which finished arms are trained again, and why."""
    pending, why = [], []
    for a in arms:
        arm_dir = root / "arms" / a.id
        if is_current(a, arm_dir):
            continue
        pending.append(a)
        reason = retrain_reason(a, arm_dir)
        if reason:
            why.append(f"  {a.id}: {reason}")
    if ui and why:
        ui.note(f"{len(why)} arm(s) that have a result in {root} are trained again:\n" + "\n".join(why))
    return pending


def retrain_reason(arm: Arm, arm_dir: Path) -> str | None:
    """Why an arm folder that is not current holds something (None for a new or interrupted arm)."""
    check = store.check_arm(arm_dir)
    if check.problems:
        return "damaged: " + "; ".join(check.problems)
    if check.summary is None:
        return None
    if check.summary["status"] == "failed":
        return "failed earlier, trying again"
    config = arm.config.model_dump(mode="json")
    keys = store.changed_keys(arm_dir, config)
    if not keys:
        return "its arm.yaml is unreadable"
    return "config changed: " + ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")


def _collect(arms: list[Arm], root: Path, extra: dict[str, dict[str, Any]] | None = None,
             first: Path | None = None) -> list[dict[str, Any]]:
    """Summaries in arm order, read from the run folder (the source of truth; ``first`` is read before it)."""
    out = []
    for i, a in enumerate(arms):
        s = (first and store.read_summary(first / "arms" / a.id)) or store.read_summary(root / "arms" / a.id) \
            or (extra or {}).get(a.id)
        out.append(s or {"arm_id": a.id, "index": i, "values": a.config.values, "seed": a.config.seed,
                         "status": "failed", "error": "no result (interrupted); rerun to train it"})
    return out


def _start(exp: Experiment, root: Path, arms: list[Arm], ui: Any, pending: list[Arm]) -> None:
    store.write_text(root / "experiment.yaml", dump_yaml(exp.model_dump(mode="json")))
    if ui:
        ui.start(len(arms))
        for a in arms:
            if a not in pending:
                ui.arm_done(a, store.read_summary(root / "arms" / a.id), True)


def _run_local(exp: Experiment, root: Path, arms: list[Arm], *, ui: Any, on_arm: Any,
               out_root: Path | None = None, lock: bool = True) -> list[dict[str, Any]]:
    """All pending arms in this process, through the same oracle + tuner as the distributed modes."""
    store.check_writable(root)
    with store.RunLock(root) if lock else contextlib.nullcontext():
        pending = _pending(arms, root, ui if lock else None)
        if pending:
            check_inputs(pending, trains_here=True)
        if lock:
            _start(exp, root, arms, ui, pending)
        try:
            for a in arms:
                if a not in pending and on_arm:
                    on_arm(a, store.read_summary(root / "arms" / a.id), True)
            if pending:
                # A non-chief multi_worker process decides "done" from the chief's folder and writes to scratch.
                tuner = make_tuner(make_oracle(pending, config_digest(exp)), arms, root, out_root=out_root, ui=ui,
                                   on_arm=on_arm, tuner_dir=(out_root / TUNER_DIR) if out_root else None)
                tuner.search()
        finally:
            if ui and lock:
                ui.stop()
    return _collect(arms, root, first=out_root)


# ------------------------------------------------------------------------------------------ chief/worker


def serve_chief(exp: Experiment, root: Path, arms: list[Arm], *, workers: int, ui: Any, on_arm: Any,
                poll_s: float = 0.2) -> list[dict[str, Any]]:
    """Chief: holds the lock, serves the oracle, starts ``workers`` local workers, reports arms as they end."""
    store.check_writable(root)
    with store.RunLock(root):
        pending = _pending(arms, root, ui)
        if pending:  # prepares each dataset once, here: several workers preparing one data dir would race
            check_inputs(pending, trains_here=False)
        _start(exp, root, arms, ui, pending)
        for a in arms:
            if a not in pending and on_arm:
                on_arm(a, store.read_summary(root / "arms" / a.id), True)
        lost: dict[str, dict[str, Any]] = {}
        try:
            if pending:
                _serve_pending(exp, root, arms, pending, lost, workers=workers, ui=ui, on_arm=on_arm, poll_s=poll_s)
        finally:
            if ui:
                ui.stop()
    return _collect(arms, root, lost)


def _serve_pending(exp: Experiment, root: Path, arms: list[Arm], pending: list[Arm], lost: dict[str, Any], *,
                   workers: int, ui: Any, on_arm: Any, poll_s: float) -> None:
    """Serves the pending arms to workers until every one has ended; records in ``lost`` those never run."""
    shutil.rmtree(root / TUNER_DIR / "oracle", ignore_errors=True)  # the run folder decides
    oracle = make_oracle(pending, config_digest(exp), root / TUNER_DIR / "oracle")
    todo = {a.id for a in pending}
    on_end = _arm_reporter(arms, root, todo, lost, ui, on_arm)
    cmd = [sys.executable, "-m", "ablations", "run", str(root / "experiment.yaml"), "--out",
           str(root.parent), "--no-report"]
    serve_oracle(oracle, command=cmd, workers=workers, logs=root / TUNER_DIR, on_end=on_end,
                 done=lambda: not todo, poll_s=poll_s)
    by_id = {a.id: a for a in arms}
    for arm_id in sorted(todo):  # no local worker left and no other worker can join
        lost[arm_id] = _lost(by_id[arm_id], f"all local workers exited before this arm ran; see {root / TUNER_DIR}")


def _lost(arm: Arm, error: str) -> dict[str, Any]:
    return {"arm_id": arm.id, "values": arm.config.values, "seed": arm.config.seed, "status": "failed",
            "error": error}


def _arm_reporter(arms: list[Arm], root: Path, todo: set[str], lost: dict[str, dict[str, Any]], ui: Any,
                  on_arm: Any) -> Callable[[Any], None]:
    """The chief's callback for an ended trial: reads its arm's summary, records a lost arm, shows it."""
    kt = _kt()
    by_id = {a.id: a for a in arms}

    def report(trial: Any) -> None:
        arm_id = trial.hyperparameters.values.get("arm")
        if arm_id not in todo:
            return
        todo.discard(arm_id)
        summary = store.read_summary(root / "arms" / arm_id)
        if summary is None or trial.status == kt.engine.trial.TrialStatus.FAILED:
            error = trial.message or "the worker reported no summary.json (is the run folder shared with the worker?)"
            summary = lost[arm_id] = _lost(by_id[arm_id], error + ("; rerun to train it again" if summary is None
                                                                   else ""))
        if ui:
            ui.arm_done(by_id[arm_id], summary, False)
        if on_arm:
            on_arm(by_id[arm_id], summary, False)

    return report


def join_chief(exp: Experiment, root: Path, arms: list[Arm], *, ui: Any, on_arm: Any) -> list[dict[str, Any]]:
    """Worker: takes arms from the chief until none are left; writes into the (shared) run folder, no lock."""
    digest = config_digest(exp)
    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    # Workers get their own keras-tuner project folder: the chief's is recreated at each start.
    tuner = make_tuner(make_oracle(arms, digest), arms, root, ui=None, on_arm=_printer(ui, on_arm),
                       digest=digest, project=f"worker_{tuner_id}")
    chief = tuner.oracle.get_space()  # blocks until the chief answers
    if chief.values.get("config") != digest:
        raise SweepError(f"this worker's config differs from the chief's (digest {digest} vs "
                         f"{chief.values.get('config')}); start workers with the chief's CONFIG and --set options")
    tuner.search()
    return tuner.results


def _printer(ui: Any, on_arm: Any) -> Callable[[Arm, dict[str, Any], bool], None]:
    def show(arm: Arm, summary: dict[str, Any], skipped: bool) -> None:
        if ui:
            ui.console.print(f"{summary.get('status', '?'):9} {arm.id} {summary.get('error') or ''}",
                             highlight=False, markup=False)
        if on_arm:
            on_arm(arm, summary, skipped)

    return show
