"""The run folder: what counts as a result (damaged arms never do), current configs, trial records, and
clear errors when the disk is full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

from ablations import store


def finished_arm(arm_dir: Path, status: str = "completed") -> Path:
    """A synthetic finished arm: summary + the required tables (one row each)."""
    for table in store.REQUIRED_TABLES:
        store.write_parquet(arm_dir / f"{table}.parquet", pd.DataFrame({"step": [0, 1], "x": [1.0, 2.0]}))
    store.write_json(arm_dir / "summary.json", {"arm_id": arm_dir.name, "status": status, "seed": 0, "values": {}})
    return arm_dir


def test_a_finished_arm_is_done(tmp_path: Path) -> None:
    arm = finished_arm(tmp_path / "a")
    check = store.check_arm(arm)
    assert check.done and check.problems == [] and store.is_done(arm)
    assert not store.is_done(finished_arm(tmp_path / "f", status="failed"))  # retried on resume
    assert store.check_arm(tmp_path / "nothing") == store.ArmCheck(None, [])  # not started: not damaged


def test_a_table_cut_in_half_makes_the_arm_damaged_and_not_done(tmp_path: Path) -> None:
    arm = finished_arm(tmp_path / "a")
    data = (arm / "params.parquet").read_bytes()
    (arm / "params.parquet").write_bytes(data[: len(data) // 2])
    check = store.check_arm(arm)
    assert not check.done and len(check.problems) == 1 and check.problems[0].startswith("params.parquet is damaged")
    with pytest.raises(store.StoreError, match=r"params.parquet is damaged"):
        store.read_table(arm, "params", check.summary)
    finished_arm(tmp_path / "run" / "arms" / "ok")
    (tmp_path / "run" / "arms" / "bad").mkdir()
    os.replace(arm, tmp_path / "run" / "arms" / "bad")
    problems: list[str] = []
    df = store.load_table(tmp_path / "run", "params", problems)  # the damaged arm never hides the others
    assert set(df.arm_id) == {"ok"} and len(problems) == 1 and "bad/params.parquet is damaged" in problems[0]


@pytest.mark.parametrize("content,needle", [
    ("[1]", "not an arm summary (it holds a list)"),
    ("{\"status\": \"completed\"", "summary.json is unreadable"),
    ("{\"status\": \"weird\", \"arm_id\": \"a\"}", "not an arm summary (status 'weird'"),
])
def test_a_summary_that_is_not_one_is_damaged(tmp_path: Path, content: str, needle: str) -> None:
    arm = finished_arm(tmp_path / "a")
    (arm / "summary.json").write_text(content)
    check = store.check_arm(arm)
    assert check.summary is None and not check.done and needle in check.problems[0]
    assert store.read_summary(arm) is None and store.load_summaries(tmp_path) == []


def test_a_deleted_required_table_makes_the_arm_damaged(tmp_path: Path) -> None:
    arm = finished_arm(tmp_path / "a")
    (arm / "blocks.parquet").unlink()
    assert store.check_arm(arm).problems == ["blocks.parquet is missing"]


def test_is_current_and_changed_keys(tmp_path: Path) -> None:
    arm = finished_arm(tmp_path / "a")
    cfg = {"train": {"epochs": 2, "optimizer": {"name": "sgd"}}, "seed": 0}
    store.write_text(arm / "arm.yaml", "seed: 0\ntrain:\n  optimizer: {name: sgd}\n  epochs: 2\n")
    assert store.is_current(arm, cfg) and store.changed_keys(arm, cfg) == []
    assert sorted(store.changed_keys(arm, {**cfg, "train": {"epochs": 3, "optimizer": {"name": "adam"}}})) == \
        ["train.epochs", "train.optimizer.name"]
    (arm / "params.parquet").write_bytes(b"PAR1 half")
    assert not store.is_current(arm, cfg)  # damaged: trained again


def test_trial_records_round_trip_and_skip_foreign_files(tmp_path: Path) -> None:
    store.write_trial(tmp_path, {"trial": "2", "values": {"lr": 0.1}, "status": "completed"})
    store.write_trial(tmp_path, {"trial": "10", "values": {}, "status": "failed"})
    (tmp_path / store.TRIALS_DIR / "junk.json").write_text("[1]")
    (tmp_path / store.TRIALS_DIR / "half.json").write_text("{\"trial\": ")
    assert [t["trial"] for t in store.read_trials(tmp_path)] == ["2", "10"]
    assert store.has_trials(tmp_path) and not store.has_trials(tmp_path / "none")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_a_store_error_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(store.StoreError) as info:
        store.write_text(tmp_path / "summary.json", "{}")
    assert str(info.value) == (f"cannot write {tmp_path / 'summary.json'}: No space left on device. Free some space "
                               f"and rerun the same command to resume.")
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_a_full_disk_while_taking_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwrite", _enospc)
    with pytest.raises(store.StoreError, match=r"cannot write .*\.lock: No space left on device"):
        with store.RunLock(tmp_path / "run"):
            pass
    monkeypatch.undo()
    with store.RunLock(tmp_path / "run"):  # the failed attempt released the lock
        pass
