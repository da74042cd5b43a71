"""The keras-tuner sweep engine: trial = arm, the run folder decides what is done, chief + workers."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from ablations.config import parse_experiment
from ablations.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


def small(name: str = "sw", activations: tuple[str, ...] = ("relu", "tanh", "sigmoid"), seeds: int = 1) -> dict:
    return {"name": name, "model": {"arch": "plain_mlp", "depth": 2, "width": 8},
            "data": {"batch_size": 64, "val_split": None},
            "train": {"epochs": 1, "steps_per_epoch": 2, "optimizer": {"name": "sgd", "learning_rate": 0.05}},
            "grid": {"model.activation": list(activations)}, "seeds": seeds}


def test_oracle_hands_every_pending_arm_to_parallel_workers_once(tmp_path: Path) -> None:
    """Three workers asking at once get three different arms (stock GridSearch would keep them waiting)."""
    from keras_tuner.engine.trial import TrialStatus

    from ablations.sweep import make_oracle

    arms = parse_experiment(small(activations=("relu", "tanh", "sigmoid", "elu"))).arms()
    oracle = make_oracle(arms, "d1", tmp_path / "oracle")
    trials = [oracle.create_trial(f"w{i}") for i in range(3)]
    assert [t.status for t in trials] == ["RUNNING"] * 3
    assert [t.hyperparameters.values["arm"] for t in trials] == [a.id for a in arms[:3]]
    assert all(t.hyperparameters.values["config"] == "d1" for t in trials)
    assert oracle.create_trial("w0").trial_id == trials[0].trial_id  # a busy worker keeps its trial
    fourth = oracle.create_trial("w3")
    assert fourth.hyperparameters.values["arm"] == arms[3].id
    assert oracle.create_trial("w4").status == TrialStatus.STOPPED  # all arms taken: an idle worker may leave
    for t in [*trials, fourth]:
        oracle.update_trial(t.trial_id, {"loss": 1.0, "status_code": 0.0})
        t.status = TrialStatus.COMPLETED
        oracle.end_trial(t)
    assert oracle.create_trial("w0").status == TrialStatus.STOPPED
    assert sorted(t.hyperparameters.values["arm"] for t in oracle.trials.values()) == sorted(a.id for a in arms)


def test_worker_with_another_config_is_refused(tmp_path: Path) -> None:
    import keras_tuner as kt

    from ablations.sweep import arm_for_trial, make_oracle, make_tuner

    arms = parse_experiment(small()).arms()
    tuner = make_tuner(make_oracle(arms, "mine"), arms, tmp_path / "x", digest="mine")
    hp = kt.HyperParameters()
    hp.Fixed("arm", arms[0].id)
    hp.Fixed("config", "chiefs")
    with pytest.raises(kt.errors.FatalError, match="config differs from the chief's"):
        arm_for_trial(kt.engine.trial.Trial(hp), tuner.by_id, "mine")
    hp2 = kt.HyperParameters()
    hp2.Fixed("arm", "model=unknown,seed=0")
    hp2.Fixed("config", "mine")
    with pytest.raises(kt.errors.FatalError, match="does not have"):
        arm_for_trial(kt.engine.trial.Trial(hp2), tuner.by_id, "mine")


def test_worker_env_splits_devices_and_threads() -> None:
    from ablations.sweep import worker_env

    env = worker_env(1, 2, "127.0.0.1", 9999, ["0", "1", "2", "3"])
    assert env["KERASTUNER_TUNER_ID"] == "worker-1" and env["KERASTUNER_ORACLE_PORT"] == "9999"
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"
    cpu = worker_env(0, 2, "127.0.0.1", 9999, [])
    assert cpu["TF_NUM_INTRAOP_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


def test_engine_runs_each_arm_once_and_the_run_folder_decides(tfds_dir: str, tmp_path: Path) -> None:
    exp = parse_experiment(small())
    calls: list[tuple[str, bool]] = []
    summaries = run_sweep(exp, tmp_path, on_arm=lambda a, s, skipped: calls.append((a.id, skipped)))
    ids = [a.id for a in exp.arms()]
    assert [s["arm_id"] for s in summaries] == ids
    assert sorted(calls) == sorted((i, False) for i in ids)  # each arm trained exactly once
    assert all(s["status"] == "completed" for s in summaries)
    root = tmp_path / "sw"
    trials = [json.loads(p.read_text()) for p in (root / ".tuner" / "oracle").glob("trial_*/trial.json")]
    assert sorted(t["hyperparameters"]["values"]["arm"] for t in trials) == sorted(ids)

    # keras-tuner's own state is not trusted on resume: garbage there, one arm's result removed.
    (root / ".tuner" / "oracle" / "oracle.json").write_text("{not json")
    (root / "arms" / ids[1] / "summary.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in (root / "arms" / ids[0]).iterdir()}
    calls.clear()
    summaries = run_sweep(exp, tmp_path, on_arm=lambda a, s, skipped: calls.append((a.id, skipped)))
    assert sorted(calls) == sorted([(ids[0], True), (ids[1], False), (ids[2], True)])
    assert {p: p.stat().st_mtime_ns for p in (root / "arms" / ids[0]).iterdir()} == before
    assert all(s["status"] == "completed" for s in summaries)


def _worker_counts(log_dir: Path) -> dict[str, int]:
    counts = {}
    for log in sorted(log_dir.glob("worker-*.log")):
        m = re.search(r"worker (\S+): (\d+) arm\(s\), 0 failed", log.read_text())
        assert m, log.read_text()[-2000:]
        counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.mark.slow
def test_chief_and_two_workers_on_loopback_run_each_arm_once(tfds_dir: str, tmp_path: Path) -> None:
    """A chief started by hand (KERASTUNER_* variables) + one local worker it starts + one worker started by hand."""
    from _procs import chief_and_hand_worker

    cfg = tmp_path / "six.yaml"
    cfg.write_text(json.dumps(small("six", seeds=2)))
    cmd = [sys.executable, "-m", "ablations", "run", str(cfg), "--out", str(tmp_path / "runs"), "--no-report"]
    chief_out, other_out = chief_and_hand_worker(cmd, cwd=ROOT)
    root = tmp_path / "runs" / "six"
    exp = parse_experiment(small("six", seeds=2))
    ids = sorted(a.id for a in exp.arms())
    assert len(ids) == 6
    trials = [json.loads(p.read_text()) for p in (root / ".tuner" / "oracle").glob("trial_*/trial.json")]
    assert sorted(t["hyperparameters"]["values"]["arm"] for t in trials) == ids  # each arm handed out once
    assert all(t["status"] == "COMPLETED" for t in trials)
    for arm_id in ids:
        assert json.loads((root / "arms" / arm_id / "summary.json").read_text())["status"] == "completed"
    local = _worker_counts(root / ".tuner")["worker-0"]
    by_hand = int(re.search(r"worker worker-by-hand: (\d+) arm\(s\), 0 failed", other_out).group(1))
    assert local + by_hand == 6 and local >= 1 and by_hand >= 1  # both trained, no arm twice
    assert "six: 6 arms" in chief_out
    # The arms trained in other processes equal an in-process run of the same arm (determinism).
    from ablations.runner import run_arm

    arm = exp.arms()[3]
    run_arm(arm, tmp_path / "again")
    pd.testing.assert_frame_equal(pd.read_parquet(root / "arms" / arm.id / "params.parquet"),
                                  pd.read_parquet(tmp_path / "again" / "params.parquet"))


FAKE_WORKER = """
import os
import keras_tuner as kt
from keras_tuner.src.distribute.oracle_client import OracleClient

hp = kt.HyperParameters()
hp.Float("x", 0.0, 1.0)
client = OracleClient(kt.oracles.RandomSearchOracle(objective=kt.Objective("loss", "min"), hyperparameters=hp))
assert client.get_space().values["gradzoo/point"] == "p0"  # the chief's announced facts reach workers
client.create_trial(os.environ["KERASTUNER_TUNER_ID"])
os._exit(3)  # dies mid-trial, without ending it
"""


@pytest.mark.slow  # 9 s; the oracle's serve loop stays in test_tune's random search
def test_serve_oracle_fails_the_trial_of_a_local_worker_that_died(tmp_path: Path) -> None:
    """The shared chief machinery (used by `ablate run` and `ablate tune`): a worker that exits mid-trial gets
    its trial failed, reported once, and the chief returns instead of waiting for it."""
    import keras_tuner as kt

    from ablations.sweep import serve_oracle

    hp = kt.HyperParameters()
    hp.Float("x", 0.0, 1.0)
    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("loss", "min"), max_trials=3, hyperparameters=hp)
    oracle._set_project_dir(str(tmp_path), "oracle")
    ended = []
    over = serve_oracle(oracle, command=[sys.executable, "-c", FAKE_WORKER], workers=1, logs=tmp_path / "logs",
                        on_end=ended.append, facts={"gradzoo/point": "p0"}, poll_s=0.05)
    assert over is False  # the search did not end: its only worker is gone
    (trial,) = ended
    assert trial.status == "FAILED" and not oracle.ongoing_trials
    assert "worker-0 exited (code 3) during this trial" in trial.message
    assert str(tmp_path / "logs" / "worker-0.log") in trial.message
    assert "x" in oracle.get_space().values and "gradzoo/point" not in oracle.get_space().values


# ------------------------------------------------------------------------------------------ damaged and stale folders


@pytest.mark.slow  # 13 s; damaged arms are named in the report by test_report's test_damaged_arms_are_named_and_the_healthy_ones_reported
def test_damaged_arms_are_named_and_trained_again_and_old_files_set_aside(tfds_dir: str, tmp_path: Path,
                                                                          capsys) -> None:
    from ablations import store
    from ablations.cli import main

    cfg = tmp_path / "d.yaml"
    cfg.write_text(json.dumps(small("dmg", activations=("relu", "tanh", "sigmoid"))))
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out), "--no-report"]) == 0
    root = out / "dmg"
    ids = [a.id for a in parse_experiment(small("dmg")).arms()]
    params = root / "arms" / ids[0] / "params.parquet"
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])  # cut in half
    (root / "arms" / ids[1] / "summary.json").write_text("[1]")
    (root / "arms" / ids[2] / "stray.parquet").write_bytes(b"not a table")  # any damaged table
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out), "--no-report"]) == 0
    text = capsys.readouterr().out
    assert "3 arm(s) that have a result" in text
    assert f"{ids[0]}: damaged: params.parquet is damaged" in text
    assert f"{ids[1]}: damaged: summary.json is not an arm summary (it holds a list)" in text
    assert f"{ids[2]}: damaged: stray.parquet is damaged" in text
    for arm_id in ids:  # trained again, nothing of the damaged folders left in them
        assert store.is_done(root / "arms" / arm_id)
        assert (root / ".replaced" / arm_id / "arm.yaml").exists()
    assert not (root / "arms" / ids[2] / "stray.parquet").exists()


def test_a_changed_base_value_says_which_arms_and_keys_before_training_them(tfds_dir: str, tmp_path: Path,
                                                                          capsys) -> None:
    from ablations.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text(json.dumps(small("stale", activations=("relu", "tanh"))))
    out = tmp_path / "runs"
    assert main(["run", str(cfg), "--out", str(out), "--no-report"]) == 0
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out), "--no-report", "--set", "train.steps_per_epoch=3"]) == 0
    text = capsys.readouterr().out
    assert "2 arm(s) that have a result" in text
    assert "activation=relu,seed=0: config changed: train.steps_per_epoch" in text
    assert text.index("config changed") < text.index("completed")  # said before training


@pytest.mark.parametrize("override,needle", [
    ("data.val_split=nope", "has no split 'nope'"),
    ("data.max_train_examples=10", "data.batch_size 64 is larger than the 10 training examples"),
    ("data.name=no_such_dataset", "dataset 'no_such_dataset' is not a TFDS dataset"),
    # Keras would cast the float targets to class ids: a meaningless loss in an arm marked completed
    ("data.name=adding_problem/T50 train.loss=sparse_categorical_crossentropy",
     "train.loss sparse_categorical_crossentropy needs class labels, but dataset 'adding_problem/T50' has "
     "regression targets: use mse"),
])
def test_bad_data_stops_the_run_before_any_arm(tfds_dir: str, tmp_path: Path, capsys, override: str,
                                               needle: str) -> None:
    from ablations.cli import main

    cfg = tmp_path / "b.yaml"
    cfg.write_text(json.dumps(small("bad")))
    sets = [a for o in override.split() for a in ("--set", o)]
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--no-report", *sets]) == 2
    text = capsys.readouterr().out
    assert needle in text and "nothing was trained" in text
    assert not (tmp_path / "runs" / "bad" / "arms").exists()


def test_an_unreachable_tpu_stops_the_run_before_any_arm(tmp_path: Path, capsys) -> None:
    from ablations.cli import main

    cfg = tmp_path / "t.yaml"
    cfg.write_text(json.dumps(small("tpu")))
    code = main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--no-report", "--set", "runtime.strategy=tpu",
                 "--set", "runtime.tpu=no-such-tpu"])
    assert code == 2
    text = capsys.readouterr().out
    assert "no TPU could be started" in text and "nothing was trained" in text
    assert not (tmp_path / "runs" / "tpu" / "arms").exists()


def test_cross_entropy_on_regression_targets_is_refused_where_the_loss_is_made() -> None:
    from ablations.factories import make_loss

    with pytest.raises(ValueError, match="needs class labels, but the dataset has regression targets"):
        make_loss("sparse_categorical_crossentropy", "regression")
    assert make_loss("auto", "regression")[1] == [] and make_loss("mse", "regression")[1] == []
