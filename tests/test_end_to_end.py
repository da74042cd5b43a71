"""End to end: a shrunken quickstart through the CLI, resume, divergence, failure, lock, report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from ablations import store
from ablations.cli import main
from ablations.config import parse_experiment
from ablations.sweep import run_sweep

# Two of the quickstart's arms (plain and residual, ReLU), depth 2, one epoch of 512 digits (8 steps): the CLI,
# the run folder and the report end to end; the report's figures themselves are test_report.py's.
SHRINK = ["--set", "model.depth=2", "--set", "train.epochs=1", "--set", "seeds=[0]",
          "--set", "grid.model.activation=[relu]", "--set", "data.max_train_examples=512"]

PARAM_COLS = ["step", "epoch", "depth", "block", "layer", "param", "role", "size", "grad_norm", "weight_norm",
              "update_norm", "update_ratio"]
BLOCK_COLS = ["step", "epoch", "depth", "block", "act_grad_norm", "act_mean", "act_std", "act_saturation",
              "act_dead", "branch_ratio", "gate_mean", "alpha", "active"]


@pytest.fixture(scope="module")
def shrunk_run(tfds_dir: str, quickstart: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs")
    rep = tmp_path_factory.mktemp("report")
    code = main(["run", str(quickstart), "--out", str(out), "--report", str(rep), *SHRINK])
    return code, out / "quickstart", rep


def test_run_folder_contents(shrunk_run) -> None:
    code, root, _ = shrunk_run
    assert code == 0
    assert (root / "experiment.yaml").exists()
    arms = sorted((root / "arms").iterdir())
    assert len(arms) == 2  # 2 model bundles, activation, depth and seeds pinned
    for arm in arms:
        names = {p.name for p in arm.iterdir()}
        assert {"arm.yaml", "summary.json", "history.parquet", "epochs.parquet", "params.parquet",
                "blocks.parquet", "final.keras"} <= names
        assert not [n for n in names if n.endswith(".tmp")]
        summary = json.loads((arm / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert summary["values"]["model.depth"] == 2
        params = pd.read_parquet(arm / "params.parquet")
        blocks = pd.read_parquet(arm / "blocks.parquet")
        assert list(params.columns) == PARAM_COLS
        assert list(blocks.columns) == BLOCK_COLS
        steps = summary["steps"]
        assert steps == 512 // 64  # one epoch, capture every step
        assert sorted(blocks["depth"].unique()) == [0, 1]
        assert len(blocks) == steps * 2
        kernels = params[(params.param == "kernel") & (params.role == "block")]
        assert (kernels.grad_norm > 0).all() and (kernels.update_ratio > 0).all()
        history = pd.read_parquet(arm / "history.parquet")
        assert list(history.step) == list(range(steps))
        assert history.lr.to_numpy() == pytest.approx(0.05)


def test_final_model_reloads(shrunk_run) -> None:
    import keras

    _, root, _ = shrunk_run
    arm = next((root / "arms").iterdir())
    model = keras.saving.load_model(arm / "final.keras")
    assert model.output_shape == (None, 10)


def test_resume_trains_nothing(shrunk_run, quickstart: Path) -> None:
    _, root, _ = shrunk_run
    before = {p: p.stat().st_mtime_ns for p in root.glob("arms/*/*")}
    code = main(["run", str(quickstart), "--out", str(root.parent), "--no-report", *SHRINK])
    assert code == 0
    after = {p: p.stat().st_mtime_ns for p in root.glob("arms/*/*")}
    assert before == after


def test_report_references_existing_pngs(shrunk_run) -> None:
    _, _, rep = shrunk_run
    html = (rep / "index.html").read_text()
    pngs = re.findall(r'src="([^"]+\.png)"', html)
    assert {"grad_vs_depth.png", "preact_grad_vs_depth.png", "loss_curves.png"} <= set(pngs)
    for png in pngs:
        assert (rep / png).stat().st_size > 1000
        assert (rep / png.replace(".png", ".csv")).exists()


@pytest.mark.slow  # 9 s; the same statuses, kept steps and error files on test_report.py's tiny run
def test_diverged_and_failed_arms_are_recorded(tfds_dir: str, tmp_path: Path) -> None:
    exp = parse_experiment({
        "name": "bad",
        "model": {"arch": "plain_mlp", "depth": 2, "width": 16},
        "train": {"epochs": 2, "optimizer": {"name": "sgd", "learning_rate": 0.05}},
        "grid": {"train.optimizer.learning_rate": [0.05, 1.0e6], "model.initializer": ["glorot_uniform", "lsuv"]},
        # LSUV that cannot converge: a config and data that are valid, an arm that fails while it starts
        "per_point": [{"point": {"model.initializer": "lsuv"},
                       "set": {"model.initializer_options": {"tol": 1e-12, "max_iter": 1}}}],
    })
    summaries = {s["arm_id"]: s for s in run_sweep(exp, tmp_path)}
    ok = summaries["learning_rate=0.05,initializer=glorot_uniform,seed=0"]
    nan = summaries["learning_rate=1000000.0,initializer=glorot_uniform,seed=0"]
    failed = summaries["learning_rate=0.05,initializer=lsuv,seed=0"]
    assert ok["status"] == "completed"
    assert nan["status"] == "diverged" and nan["diverged_at_step"] is not None
    assert failed["status"] == "failed" and "LSUV did not converge" in failed["error"]
    arm = tmp_path / "bad" / "arms" / nan["arm_id"]
    history = pd.read_parquet(arm / "history.parquet")
    assert history.step.max() <= nan["diverged_at_step"]  # nothing recorded after the blow-up
    # The statistics up to the divergence are kept, and the sweep went on to the next arms.
    assert len(history) == nan["diverged_at_step"] + 1
    assert (tmp_path / "bad" / "arms" / failed["arm_id"] / "error.txt").exists()


def test_failed_arm_gives_nonzero_exit(tfds_dir: str, tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text("name: f\nmodel: {depth: 1, width: 8, initializer: lsuv,\n"
                   "        initializer_options: {tol: 1.0e-12, max_iter: 1}}\ntrain: {epochs: 1}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--no-report"]) == 1


def test_locked_folder_is_refused_and_untouched(tfds_dir: str, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "l.yaml"
    cfg.write_text("name: locked\nmodel: {depth: 1, width: 8}\ntrain: {epochs: 1}\n")
    root = tmp_path / "runs" / "locked"
    root.mkdir(parents=True)
    (root / "experiment.yaml").write_text("earlier\n")
    with store.RunLock(root):
        code = main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--no-report"])
    assert code == 2
    assert "in use by another" in capsys.readouterr().out
    assert (root / "experiment.yaml").read_text() == "earlier\n"
    assert not (root / "arms").exists()


def test_unwritable_output_is_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "w.yaml"
    cfg.write_text("name: w\nmodel: {depth: 1, width: 8}\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["run", str(cfg), "--out", str(blocker / "runs"), "--no-report"])
    assert code == 2
    assert "not writable" in capsys.readouterr().out
