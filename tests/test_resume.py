"""Never lose a result: SIGKILL mid-arm then rerun, the lock, atomic writes, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ablations import store
from ablations.cli import main
from ablations.config import parse_experiment

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("history", "params", "blocks", "epochs")


def three_arms() -> dict:
    # Each arm trains for a few seconds, so the kill lands inside an arm.
    return {"name": "kill", "model": {"arch": "plain_mlp", "depth": 4, "width": 32},
            "data": {"batch_size": 32, "val_split": None},
            "train": {"epochs": 2, "steps_per_epoch": 30, "optimizer": {"name": "sgd", "learning_rate": 0.05}},
            "grid": {"model.activation": ["relu", "tanh", "sigmoid"]}}


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}: {proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_arm_then_rerun_completes_without_redoing(tfds_dir: str, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(json.dumps(three_arms()))
    out = tmp_path / "runs"
    root = out / "kill"
    ids = [a.id for a in parse_experiment(three_arms()).arms()]
    first, second = root / "arms" / ids[0], root / "arms" / ids[1]
    import keras_tuner  # noqa: F401  imported now, so the in-process `ablate run` below answers at once

    import ablations.runner  # noqa: F401
    import zoo

    zoo.names()
    proc = subprocess.Popen([sys.executable, "-m", "ablations", "run", str(cfg), "--out", str(out), "--no-report"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait(lambda: (first / "summary.json").exists() and (second / "arm.yaml").exists(), 180,
              "the second arm started", proc)
        assert not (second / "summary.json").exists()
        # While it runs, a second `ablate run` on the same folder is refused and changes nothing.
        assert main(["run", str(cfg), "--out", str(out), "--no-report"]) == 2
        assert "in use by another `ablate run`" in capsys.readouterr().out
        os.killpg(proc.pid, signal.SIGKILL)  # mid-arm, no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert store.read_summary(second) is None  # the interrupted arm is not complete...
    assert [s["arm_id"] for s in store.load_summaries(root)] == [ids[0]]  # ...and nothing reads it as such
    done_before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    assert main(["run", str(cfg), "--out", str(out), "--no-report"]) == 0  # the lock died with the process
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == done_before  # never redone
    for arm_id in ids:
        arm = root / "arms" / arm_id
        assert store.read_summary(arm)["status"] == "completed"
        names = {p.name for p in arm.iterdir()}
        assert {f"{t}.parquet" for t in TABLES} | {"arm.yaml", "summary.json", "final.keras"} <= names
        assert not [n for n in names if ".tmp" in n], names
        assert len(pd.read_parquet(arm / "history.parquet")) == 60
    # The restarted arm equals an uninterrupted run of it.
    from ablations.runner import run_arm

    run_arm(parse_experiment(three_arms()).arms()[1], tmp_path / "fresh")
    for t in ("history", "params", "blocks"):
        pd.testing.assert_frame_equal(pd.read_parquet(second / f"{t}.parquet"),
                                      pd.read_parquet(tmp_path / "fresh" / f"{t}.parquet"))


@pytest.mark.slow  # 14 s; two fresh runs of one arm compared bitwise: the resume tests below do it too
def test_same_config_and_seed_give_identical_tables(tfds_dir: str, tmp_path: Path) -> None:
    from ablations.runner import run_arm

    exp = parse_experiment({"name": "det", "model": {"arch": "resnet_mlp", "depth": 2, "width": 16},
                            "train": {"epochs": 1, "steps_per_epoch": 8}, "capture": {"every": 3}})
    arm = exp.arms()[0]
    for d in ("a", "b"):
        assert run_arm(arm, tmp_path / d)["status"] == "completed"
    for t in ("params", "blocks", "history"):
        a, b = pd.read_parquet(tmp_path / "a" / f"{t}.parquet"), pd.read_parquet(tmp_path / "b" / f"{t}.parquet")
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_a_crash_during_a_write_leaves_no_file_to_misread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Boom(Exception):
        pass

    df = pd.DataFrame({"x": [1.0, 2.0]})

    def half_write(self, path, *a, **k):
        Path(path).write_bytes(b"PAR1 half")
        raise Boom

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", half_write)
        with pytest.raises(Boom):
            store.write_parquet(tmp_path / "params.parquet", df)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp file
    store.write_parquet(tmp_path / "params.parquet", df)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "params.parquet"), df)


def test_leftover_temp_files_of_a_killed_arm_are_removed_before_it_reruns(tfds_dir: str, tmp_path: Path) -> None:
    from ablations.sweep import run_one

    exp = parse_experiment({"name": "t", "model": {"depth": 1, "width": 8}, "train": {"epochs": 1, "steps_per_epoch": 2}})
    arm = exp.arms()[0]
    arm_dir = tmp_path / "arms" / arm.id
    arm_dir.mkdir(parents=True)
    (arm_dir / ".params.parquet.abc123.tmp").write_bytes(b"half")
    (arm_dir / ".final.999.tmp.keras").write_bytes(b"half")
    summary, skipped = run_one(arm, 0, tmp_path, tmp_path, None)
    assert summary["status"] == "completed" and not skipped
    assert not [p for p in arm_dir.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_arm_and_a_rerun_trains_it(tfds_dir: str, tmp_path: Path, capsys) -> None:
    """chief + 2 local workers; SIGKILL one worker mid-arm: the sweep goes on, that arm is reported failed
    (exit 1), and a rerun trains only it."""
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(json.dumps(three_arms()))
    out = tmp_path / "runs"
    root = out / "kill"
    chief = subprocess.Popen([sys.executable, "-m", "ablations", "run", str(cfg), "--out", str(out), "--no-report",
                              "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        def ongoing() -> dict:  # keras-tuner's saved oracle state: tuner id -> trial it is running
            try:
                return json.loads((root / ".tuner" / "oracle" / "oracle.json").read_text())["ongoing_trials"]
            except (OSError, ValueError, KeyError):
                return {}

        _wait(lambda: len(ongoing()) == 2, 240, "both workers took an arm", chief)
        victim = sorted(ongoing())[0]
        for pid in Path(f"/proc/{chief.pid}/task/{chief.pid}/children").read_text().split():
            if f"KERASTUNER_TUNER_ID={victim}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)  # mid-arm: that arm is lost, the other goes on
        chief_out = chief.communicate(timeout=300)[0]
    finally:
        if chief.poll() is None:
            os.killpg(chief.pid, signal.SIGKILL)
            chief.wait()
    assert chief.returncode == 1, chief_out[-3000:]
    failed = [s for s in store.load_summaries(root) if s["status"] != "completed"]
    assert failed == []  # the killed arm left no summary: nothing half-done is read as a result
    done = {d.name for d in (root / "arms").iterdir() if store.is_done(d)}
    assert len(done) == 2 and "exited (code -9)" in chief_out and "1 arm(s) failed" in chief_out
    before = {d: (d / "summary.json").stat().st_mtime_ns for d in (root / "arms").iterdir() if d.name in done}
    assert main(["run", str(cfg), "--out", str(out), "--no-report"]) == 0
    assert {d: (d / "summary.json").stat().st_mtime_ns for d in before} == before
    assert all(store.is_done(d) for d in (root / "arms").iterdir())


def test_an_arm_is_current_whatever_the_key_order_of_its_stored_config(tmp_path: Path) -> None:
    import yaml

    exp = parse_experiment({"name": "t", "model": {"depth": 1, "width": 8, "activation": "leaky_relu",
                                                   "activation_options": {"negative_slope": 0.2}},
                            "train": {"epochs": 1}})
    arm = exp.arms()[0]
    cfg = arm.config.model_dump(mode="json")

    def reorder(d):  # every mapping with its keys reversed
        return {k: reorder(v) for k, v in reversed(d.items())} if isinstance(d, dict) else d

    store.write_json(tmp_path / "summary.json", {"arm_id": arm.id, "status": "completed"})
    for table in store.REQUIRED_TABLES:
        store.write_parquet(tmp_path / f"{table}.parquet", pd.DataFrame({"step": [0]}))
    (tmp_path / "arm.yaml").write_text(yaml.safe_dump(reorder(cfg), sort_keys=False))
    assert store.is_current(tmp_path, cfg)
    changed = reorder(cfg)
    changed["model"]["width"] = 9
    (tmp_path / "arm.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert not store.is_current(tmp_path, cfg)
    (tmp_path / "arm.yaml").write_text("model: [unclosed")
    assert not store.is_current(tmp_path, cfg)


# ----------------------------------------------------------------------------------- resume inside an arm

RESUME_TABLES = ("history", "params", "blocks", "epochs", "grad_hist", "per_example")


def resumable(opt_in: bool = False, **train) -> dict:
    """A deterministic arm with something random in every step (stochastic depth, dropout), histograms, a
    schedule, momentum, a fixed number of steps per epoch or natural epochs; with ``opt_in`` the per-example
    statistics and the distance from initialisation, each at a cadence of its own (its copy of w_0 must survive)."""
    instruments = {"per_example": {"every": 4}, "init_distance": {"every": 4}} if opt_in else {}
    return {"name": "resume", "model": {"arch": "stochastic_depth_mlp", "depth": 3, "width": 16, "dropout": 0.1,
                                        "survival_prob": 0.5},
            "data": {"batch_size": 32},
            "train": {"epochs": 3, "optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9,
                                                 "schedule": {"name": "cosine", "warmup_steps": 5}},
                      "checkpoint_steps": 7, **train},
            "capture": {"every": 2, "histograms": True, "instruments": instruments}}


def _assert_same_tables(a: Path, b: Path) -> None:
    import numpy as np

    for t in RESUME_TABLES:
        if not (a / f"{t}.parquet").exists() and not (b / f"{t}.parquet").exists():
            continue  # an opt-in table neither run wrote
        x, y = pd.read_parquet(a / f"{t}.parquet"), pd.read_parquet(b / f"{t}.parquet")
        assert list(x.columns) == list(y.columns) and len(x) == len(y), t
        for col in x.columns:  # bitwise: NaN where NaN, the same float32 everywhere else
            np.testing.assert_array_equal(x[col].to_numpy(), y[col].to_numpy(), err_msg=f"{t}.{col}")


class _Kill(BaseException):
    """What a kill looks like to the arm: nothing after it runs (not an Exception: run_arm records those)."""


@pytest.mark.parametrize("train", [pytest.param({}, id="natural epochs"),
                                   # fixed steps: the same resume path over shorter epochs (~30 s); natural epochs stays in the default suite
                                   pytest.param({"steps_per_epoch": 20}, marks=pytest.mark.slow, id="fixed steps"),
                                   pytest.param({"opt_in": True}, marks=pytest.mark.slow, id="opt-in instruments")])
def test_an_interrupted_arm_resumes_to_the_tables_of_an_uninterrupted_run(tfds_dir: str, tmp_path: Path,
                                                                          train: dict) -> None:
    import keras

    from ablations.runner import run_arm

    # 512 examples: 16 steps per natural epoch, so the kills below land in epochs 1 and 2 (resumes across epochs).
    arm = parse_experiment({**resumable(**train), "data": {"batch_size": 32, "max_train_examples": 512}}).arms()[0]
    full = run_arm(arm, tmp_path / "full")
    assert full["status"] == "completed" and full["resumed_from_step"] is None

    class Stop(keras.callbacks.Callback):
        async_safe = True

        def __init__(self, at: int):
            super().__init__()
            self.at, self.seen = at, 0

        def on_train_batch_begin(self, batch, logs=None):
            if self.seen == self.at:
                raise _Kill()
            self.seen += 1

    folder = tmp_path / "killed"
    for at in (17, 9):  # killed twice (the second time 9 steps after the resume), then left to finish
        with pytest.raises(_Kill):
            run_arm(arm, folder, callbacks=[Stop(at)])
        assert not (folder / "summary.json").exists() and (folder / ".resume" / "state.json").exists()
    resumed = run_arm(arm, folder)
    # The last checkpoint before the second kill (every 7 steps, and at each epoch's end).
    assert resumed["status"] == "completed" and 17 <= resumed["resumed_from_step"] <= 26
    assert not (folder / ".resume").exists()
    _assert_same_tables(tmp_path / "full", folder)
    if train.get("opt_in"):
        assert (folder / "per_example.parquet").exists()
        p = pd.read_parquet(folder / "params.parquet")  # its own cadence survived the resumes too
        due = p.step % 4 == 0
        assert p.loc[due, "init_distance"].notna().all() and p.loc[~due, "init_distance"].isna().all()
    assert resumed["final"] == full["final"]


def test_a_checkpoint_of_another_config_is_not_resumed(tfds_dir: str, tmp_path: Path) -> None:
    from ablations.checkpoint import digest, load

    a = parse_experiment(resumable()).arms()[0].config.model_dump(mode="json")
    b = parse_experiment({**resumable(), "seeds": [1]}).arms()[0].config.model_dump(mode="json")
    assert digest(a) != digest(b)
    assert load(tmp_path, digest(a)) is None  # no checkpoint at all: a fresh start


@pytest.mark.slow
def test_sigkill_at_ten_random_moments_then_resume_gives_the_uninterrupted_tables(tfds_dir: str,
                                                                                   tmp_path: Path) -> None:
    """`ablate run` killed with SIGKILL 10 times at random moments, rerun each time: same tables, bitwise."""
    import random

    cfg = tmp_path / "resume.yaml"
    cfg.write_text(json.dumps({**resumable(), "train": {**resumable()["train"], "epochs": 60, "checkpoint_steps": 5}}))
    cmd = [sys.executable, "-m", "ablations", "run", str(cfg), "--no-report"]
    assert subprocess.run([*cmd, "--out", str(tmp_path / "full")], cwd=ROOT, capture_output=True).returncode == 0
    rng, kills = random.Random(7), []
    out = tmp_path / "killed"
    arm = out / "resume" / "arms" / "seed=0"
    while len(kills) < 10:
        started = time.time()
        proc = subprocess.Popen([*cmd, "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        # A random moment once this attempt trains (it has saved a checkpoint): TensorFlow's start-up takes
        # 8-20 s on this shared machine, so a fixed delay would mostly kill before training starts.
        state = arm / ".resume" / "state.json"
        while not (state.exists() and state.stat().st_mtime >= started):
            if proc.poll() is not None or time.time() - started > 120:
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            break  # finished (the arm was done)
        try:
            proc.wait(timeout=rng.uniform(0.0, 2.5))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(json.loads(state.read_text())["step"] if state.exists() else 0)
            continue
        break  # finished before the kill: start the next kill sooner
    final = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-2000:]
    summary = json.loads((arm / "summary.json").read_text())
    assert summary["status"] == "completed"
    print(f"kills at checkpoint steps {kills}; final run resumed from step {summary.get('resumed_from_step')}")
    assert sum(k > 0 for k in kills) >= 5 and len(set(kills)) >= 4  # most kills landed inside training
    _assert_same_tables(tmp_path / "full" / "resume" / "arms" / "seed=0", arm)


@pytest.mark.slow  # 15 s; resume from a checkpoint: the natural-epochs and SIGKILL tests here
def test_the_sweep_keeps_an_interrupted_arms_checkpoint_and_resumes_it(tfds_dir: str, tmp_path: Path) -> None:
    """`ablate run` sets an interrupted arm's folder aside, unless it holds a checkpoint of the same config."""
    import keras

    from ablations.runner import run_arm
    from ablations.sweep import run_one

    arm = parse_experiment(resumable(epochs=1)).arms()[0]

    class Stop(keras.callbacks.Callback):
        async_safe = True

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 16:
                raise _Kill()

    root = tmp_path / "run"
    with pytest.raises(_Kill):
        run_arm(arm, root / "arms" / arm.id, callbacks=[Stop()])
    summary, skipped = run_one(arm, 0, root, root, None)
    assert not skipped and summary["status"] == "completed" and summary["resumed_from_step"] == 14
    assert not (root / ".replaced" / arm.id).exists()
