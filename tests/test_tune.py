"""`ablate tune`: searches complete and resume, best.yaml runs, per-arm tuning, pruning, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ablations import store
from ablations.config import ConfigError, load_experiment, parse_experiment
from ablations.store import read_trials
from ablations.tune import run_search

BASE = {
    "name": "t",
    "model": {"arch": "plain_mlp", "depth": 2, "width": 8, "activation": "relu"},
    "train": {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.05}},
    "data": {"max_train_examples": 256, "batch_size": 64},
}


def _exp(**search):
    raw = json.loads(json.dumps(BASE))
    raw["search"] = {"tuner": "random", "objective": "val_loss", "max_trials": 3,
                     "space": {"train.optimizer.learning_rate": {"log_uniform": [1e-3, 0.5]}}, **search}
    return raw


def test_random_search_completes_resumes_and_writes_best_yaml(tfds_dir: str, tmp_path: Path) -> None:
    exp = parse_experiment(_exp())
    result = run_search(exp, tmp_path)
    sroot = tmp_path / "t" / "search"
    trials = read_trials(sroot)
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    for t in trials:  # every trial is an arm folder with its layer statistics
        arm = sroot / "arms" / t["arms"][0]
        assert store.read_summary(arm)["status"] == "completed"
        assert (arm / "params.parquet").exists() and (arm / "blocks.parquet").exists()
    best = min(trials, key=lambda t: t["val_loss"])
    assert result["points"][0]["best"]["trial"] == best["trial"]
    best_exp = load_experiment(result["best_yaml"])  # validates, and is runnable by `ablate run`
    assert best_exp.search is None
    assert best_exp.train.optimizer.learning_rate == pytest.approx(best["values"]["train.optimizer.learning_rate"])

    before = {p: p.stat().st_mtime_ns for p in sroot.glob("arms/*/summary.json")}
    run_search(exp, tmp_path)  # resume: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in sroot.glob("arms/*/summary.json")} == before
    assert len(read_trials(sroot)) == 3


def test_pruning_stops_a_vanishing_trial_early(tfds_dir: str, tmp_path: Path) -> None:
    raw = _exp(max_trials=1, space={"model.activation": {"choice": ["sigmoid"]}},
               prune={"vanishing_at_init": True, "check_steps": 2})
    raw["model"].update(depth=14, width=16)
    raw["train"]["epochs"] = 3
    run_search(parse_experiment(raw), tmp_path)
    (trial,) = read_trials(tmp_path / "t" / "search")
    assert trial["status"] == "pruned" and "vanishing at init" in trial["reason"]
    summary = store.read_summary(tmp_path / "t" / "search" / "arms" / trial["arms"][0])
    assert summary["status"] == "pruned" and summary["steps"] < 3 * (256 // 64)  # stopped early
    assert "first/last ratio" in summary["pruned_reason"]


@pytest.mark.slow  # 29 s; the search, resume and best.yaml: test_random_search_completes_resumes_and_writes_best_yaml
def test_per_arm_tuning_runs_every_grid_point_with_its_best_values(tfds_dir: str, tmp_path: Path) -> None:
    raw = _exp(max_trials=2, per_arm=True)
    raw["grid"] = {"model.activation": ["relu", "tanh"]}
    raw["seeds"] = [0, 1]
    result = run_search(parse_experiment(raw), tmp_path)
    assert [p["label"] for p in result["points"]] == ["activation=relu", "activation=tanh"]
    final = {s["arm_id"]: s for s in result["final"]}
    assert sorted(final) == ["activation=relu,seed=0", "activation=relu,seed=1", "activation=tanh,seed=0",
                             "activation=tanh,seed=1"]
    for point in result["points"]:
        lr = point["best"]["values"]["train.optimizer.learning_rate"]
        for seed in (0, 1):
            arm = tmp_path / "t" / "final" / "arms" / f"{point['label']},seed={seed}"
            cfg = yaml.safe_load((arm / "arm.yaml").read_text())
            assert cfg["train"]["optimizer"]["learning_rate"] == pytest.approx(lr)
    # best.yaml is one experiment (the grid, each point's best values in per_point) that `ablate run` trains
    # into exactly what final/ holds.
    from ablations.cli import main

    best_yaml = tmp_path / "t" / "best.yaml"
    best = yaml.safe_load(best_yaml.read_text())
    assert isinstance(best, dict) and "search" not in best and best["grid"] == raw["grid"]
    assert [p["point"] for p in best["per_point"]] == [{"model.activation": "relu"}, {"model.activation": "tanh"}]
    assert main(["validate", str(best_yaml)]) == 0
    assert main(["run", str(best_yaml), "--out", str(tmp_path / "again"), "--no-report"]) == 0
    for arm_id in final:
        ran, tuned = tmp_path / "again" / "t" / "arms" / arm_id, tmp_path / "t" / "final" / "arms" / arm_id
        assert yaml.safe_load((ran / "arm.yaml").read_text()) == yaml.safe_load((tuned / "arm.yaml").read_text())
        pd.testing.assert_frame_equal(pd.read_parquet(ran / "params.parquet"), pd.read_parquet(tuned / "params.parquet"))


@pytest.mark.parametrize("space,objective,needle", [
    ({"train.optimizer.learnin_rate": {"log_uniform": [1e-3, 1]}}, "val_loss", "Did you mean 'learning_rate'"),
    ({"train.optimizer.learning_rate": {"uniform": [0.5, 0.1]}}, "val_loss", "low 0.5 must be < high 0.1"),
    ({"train.optimizer.learning_rate": {"log_uniform": [0, 1]}}, "val_loss", "cannot include 0"),
    ({"train.epochs": {"int": [0, 3]}}, "val_loss", "'train.epochs': Input should be greater than 0"),
    ({"train.optimizer.learning_rate": {"log_uniform": [1e-3, 1]}}, "val_acc", "objective 'val_acc' is not recorded"),
    ({}, "val_loss", "search.space is empty"),
])
def test_bad_search_input_fails_before_training(space, objective, needle) -> None:
    raw = _exp(objective=objective, space=space)
    with pytest.raises(ConfigError) as err:
        parse_experiment(raw)
    assert needle in str(err.value)


def test_tune_without_search_section_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from ablations.cli import main

    cfg = tmp_path / "n.yaml"
    cfg.write_text("name: n\nmodel: {depth: 1, width: 8}\n")
    assert main(["tune", str(cfg), "--out", str(tmp_path)]) == 2
    assert "no `search:` section" in capsys.readouterr().out


def test_unknown_model_option_in_space_is_refused(tmp_path: Path, capsys) -> None:
    from ablations.cli import main

    cfg = tmp_path / "m.yaml"
    cfg.write_text("name: m\nmodel: {depth: 1, width: 8}\n"
                   "search: {space: {model.dpeth: {int: [1, 4]}}}\n")
    assert main(["tune", str(cfg), "--out", str(tmp_path)]) == 2
    assert "dpeth" in capsys.readouterr().out


@pytest.mark.slow  # a search killed mid-trial (~35 s); the sweep's kill tests stay in the default suite
def test_search_killed_mid_trial_resumes_without_redoing_trials(tfds_dir: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    raw = _exp(max_trials=4)
    raw["train"]["epochs"] = 3
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "ablations", "tune", str(cfg), "--out", str(tmp_path / "runs"), "--no-report"]
    env = dict(os.environ, GRADZOO_DATA_DIR=tfds_dir)
    sroot = tmp_path / "runs" / "t" / "search"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while len(read_trials(sroot)) < 2 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert len(read_trials(sroot)) >= 2, (tmp_path / "first.log").read_text()[-2000:]
        finally:
            proc.kill()  # SIGKILL, mid-search
            proc.wait()
    finished = {t["trial"]: t for t in read_trials(sroot)}
    before = {p: p.stat().st_mtime_ns for p in sroot.glob("arms/*/summary.json")
              if any(p.parent.name in t["arms"] for t in finished.values())}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trials = read_trials(sroot)
    assert len(trials) == 4 and all(t["status"] == "completed" for t in trials)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished trials were not trained again
    for tid, t in finished.items():
        assert next(x for x in trials if x["trial"] == tid)["values"] == t["values"]


@pytest.mark.slow  # two worker processes (~30 s); test_sweep.py's serve-oracle tests keep local workers in the default
def test_random_search_with_two_local_workers_runs_each_trial_once(tfds_dir: str, tmp_path: Path) -> None:
    """`ablate tune --workers 2`: this process is the chief; two worker processes run the trials."""
    exp = parse_experiment(_exp(max_trials=4))
    result = run_search(exp, tmp_path, workers=2)
    sroot = tmp_path / "t" / "search"
    trials = read_trials(sroot)
    assert [t["trial"] for t in trials] == ["0", "1", "2", "3"] and all(t["status"] == "completed" for t in trials)
    assert sorted(p.name for p in (sroot / "trials").iterdir()) == ["0.json", "1.json", "2.json", "3.json"]
    for t in trials:  # every trial is an arm folder the workers wrote into the shared run folder
        assert store.read_summary(sroot / "arms" / t["arms"][0])["status"] == "completed"
    oracle = [json.loads(p.read_text()) for p in (sroot / ".tuner" / "oracle").glob("trial_*/trial.json")]
    assert sorted(t["trial_id"] for t in oracle) == ["0", "1", "2", "3"]  # each trial handed out once
    assert all(t["status"] == "COMPLETED" for t in oracle)
    logs = [(sroot / ".tuner" / f"worker-{i}.log").read_text() for i in (0, 1)]
    counts = [int(re.search(r"worker worker-\d: (\d+) trial\(s\)", log).group(1)) for log in logs]
    assert sum(counts) == 4, logs
    best = min(trials, key=lambda t: t["val_loss"])
    assert result["points"][0]["best"]["trial"] == best["trial"]
    assert load_experiment(result["best_yaml"]).train.optimizer.learning_rate == pytest.approx(
        best["values"]["train.optimizer.learning_rate"])

    oracle_state = json.loads((sroot / ".tuner" / "oracle" / "oracle.json").read_text())
    assert oracle_state["ongoing_trials"] == {}  # saved after the last trial ended: a resume redoes none
    before = {p: p.stat().st_mtime_ns for p in [*sroot.glob("arms/*/summary.json"), *sroot.glob(".tuner/*.log")]}
    run_search(exp, tmp_path, workers=2)  # resume of a finished search: no worker starts, nothing trains
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(read_trials(sroot)) == 4

    # The search's report reads the records the workers wrote: objective vs values, history, best vs worst.
    import pandas as pd

    from ablations.report.tuning import build_tuning_report

    index = build_tuning_report(tmp_path / "t", tmp_path / "rep")
    html = index.read_text()
    for key in ("objective_vs_values", "trial_history", "best_worst_gradient_flow"):
        assert f'src="{key}.png"' in html and (tmp_path / "rep" / f"{key}.png").stat().st_size > 5000, key
    csv = pd.read_csv(tmp_path / "rep" / "objective_vs_values.csv").sort_values("trial")
    assert csv["trial"].tolist() == [0, 1, 2, 3]
    assert csv["val_loss"].tolist() == pytest.approx([t["val_loss"] for t in trials])
    flow = pd.read_csv(tmp_path / "rep" / "best_worst_gradient_flow.csv")
    assert flow["which"].str.startswith(f"best (trial {best['trial']})").any()


def test_negative_workers_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from ablations.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(_exp()))
    assert main(["tune", str(cfg), "--out", str(tmp_path), "--workers", "-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().out


def test_the_chief_records_a_trial_that_failed_without_a_record(tmp_path: Path) -> None:
    import keras_tuner as kt

    from ablations.tune import _ended_record

    hp = kt.HyperParameters()
    hp.Fixed("train.optimizer.learning_rate", 0.1)
    trial = kt.engine.trial.Trial(hp, trial_id="2", status="FAILED")
    trial.message = "worker-1 exited (code -9) during this trial; see x/worker-1.log"
    record = _ended_record(tmp_path, trial)  # its worker died mid-trial: the chief writes the record
    assert read_trials(tmp_path) == [record]
    assert record["status"] == "failed" and record["reason"] == trial.message and record["arms"] == []
    trial.message = "later"
    assert _ended_record(tmp_path, trial)["reason"] != "later"  # a record that exists is never rewritten
    done = kt.engine.trial.Trial(hp, trial_id="3", status="COMPLETED")
    _ended_record(tmp_path, done)  # completed, record not visible yet (shared file system): not overwritten
    assert [t["trial"] for t in read_trials(tmp_path)] == ["2"]


def test_a_worker_refuses_a_chief_with_another_config_or_search() -> None:
    from ablations.sweep import SweepError
    from ablations.tune import CONFIG, POINT, _check_facts

    bases = {"activation=relu": {}, "activation=tanh": {}}
    assert _check_facts({CONFIG: "d", POINT: "activation=tanh"}, "d", bases, None) == "activation=tanh"
    with pytest.raises(SweepError, match="config differs from the chief's"):
        _check_facts({CONFIG: "other", POINT: "activation=tanh"}, "d", bases, None)
    with pytest.raises(SweepError, match="not an `ablate tune` chief"):
        _check_facts({"arm": "x", "config": "d"}, "d", bases, None)  # an `ablate run` chief
    with pytest.raises(SweepError, match="was not started for"):
        _check_facts({CONFIG: "d", POINT: "activation=tanh"}, "d", bases, "activation=relu")


def _children_with_env(pid: int, entry: str) -> list[int]:
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if entry.encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            found.append(int(child))
    return found


@pytest.mark.slow
def test_a_killed_tune_worker_fails_only_its_trial(tfds_dir: str, tmp_path: Path) -> None:
    """`ablate tune --workers 2`; SIGKILL one worker mid-trial: its trial is recorded failed, the other worker
    finishes the search, the chief does not wait for the dead one; a rerun trains nothing again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = _exp(max_trials=3)
    raw["train"]["epochs"] = 3
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    sroot = tmp_path / "runs" / "t" / "search"
    chief = subprocess.Popen([sys.executable, "-m", "ablations", "tune", str(cfg), "--out", str(tmp_path / "runs"),
                              "--no-report", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        def ongoing() -> dict:
            try:
                return json.loads((sroot / ".tuner" / "oracle" / "oracle.json").read_text())["ongoing_trials"]
            except (OSError, ValueError, KeyError):
                return {}

        def unfinished() -> dict:  # oracle.json may still list an ended trial; a trial with a record has ended
            return {w: t for w, t in ongoing().items() if not (sroot / "trials" / f"{t}.json").exists()}

        deadline = time.time() + 240
        while len(unfinished()) < 2 and time.time() < deadline and chief.poll() is None:
            time.sleep(0.05)
        running = unfinished()
        assert len(running) == 2, "both workers never ran a trial at once"
        victim = sorted(running)[0]
        (pid,) = _children_with_env(chief.pid, f"KERASTUNER_TUNER_ID={victim}")
        os.kill(pid, signal.SIGKILL)
        out = chief.communicate(timeout=300)[0]
    finally:
        if chief.poll() is None:
            os.killpg(chief.pid, signal.SIGKILL)
            chief.wait()
    assert chief.returncode == 0, out[-3000:]
    trials = {t["trial"]: t for t in read_trials(sroot)}
    assert sorted(trials) == ["0", "1", "2"]
    lost = trials[running[victim]]
    assert lost["status"] == "failed" and f"{victim} exited (code -9)" in lost["reason"], lost
    assert [t["status"] for k, t in sorted(trials.items()) if k != running[victim]] == ["completed"] * 2
    before = {p: p.stat().st_mtime_ns for p in sroot.glob("arms/*/summary.json")}
    run_search(load_experiment(cfg), tmp_path / "runs")  # resume in one process: the search is over
    assert {p: p.stat().st_mtime_ns for p in sroot.glob("arms/*/summary.json")} == before
    assert read_trials(sroot) == sorted(trials.values(), key=lambda t: int(t["trial"]))


@pytest.mark.slow
def test_a_worker_started_by_hand_follows_the_chief_through_every_grid_point(tfds_dir: str, tmp_path: Path) -> None:
    """per_arm search, chief started by hand with one local worker + one worker started by hand: the latter
    learns from the chief which grid point to search, goes on to the next one, and exits after the last."""
    import sys

    from _procs import chief_and_hand_worker

    raw = _exp(max_trials=2, per_arm=True)
    raw["grid"] = {"model.activation": ["relu", "tanh"]}
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "ablations", "tune", str(cfg), "--out", str(tmp_path / "runs"), "--no-report"]
    chief_out, other_out = chief_and_hand_worker(cmd)
    by_hand = int(re.search(r"worker worker-by-hand: (\d+) trial\(s\)", other_out).group(1))
    local = sum(int(re.search(r"worker worker-0: (\d+) trial\(s\)", log.read_text()).group(1))
                for log in (tmp_path / "runs" / "t" / "search").glob("*/.tuner/worker-0.log"))
    assert by_hand + local == 4
    for label in ("activation=relu", "activation=tanh"):
        trials = read_trials(tmp_path / "runs" / "t" / "search" / label)
        assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)
    assert len(yaml.safe_load((tmp_path / "runs" / "t" / "best.yaml").read_text())) == 2
