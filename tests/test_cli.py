"""The command line: validate, zoo, and clear errors (exit code 2) for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from ablations.cli import main


def test_validate_lists_arms(quickstart: Path, capsys) -> None:
    assert main(["validate", str(quickstart)]) == 0
    out = capsys.readouterr().out
    assert "24 arms" in out
    assert "model=resnet_mlp+inv_sqrt_depth,activation=relu,depth=16,seed=1" in out


def test_validate_with_overrides(quickstart: Path, capsys) -> None:
    assert main(["validate", str(quickstart), "--set", "model.depth=2", "--set", "seeds=1"]) == 0
    assert "4 arms" in capsys.readouterr().out


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  depth: [1, 2\n")
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "bad.yaml:" in out and "YAML syntax error" in out


def test_unknown_model_lists_known(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text("name: x\nmodel: {arch: resnet_mpl}\n")
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "resnet_mlp" in out and "plain_mlp" in out and "Did you mean" in out


def test_unknown_model_option_suggests(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "o.yaml"
    bad.write_text("name: x\nmodel: {arch: plain_mlp, dpeth: 3}\n")
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "dpeth" in out and "'depth'" in out


def test_zoo_lists_models(capsys) -> None:
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "plain_mlp" in out and "resnet_mlp" in out


# ------------------------------------------------------------------------------------------ quiet and fast


def test_validate_and_zoo_never_import_tensorflow() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for args in (["validate", "configs/quickstart.yaml"], ["zoo"]):
        code = ("import sys, time; t = time.time(); from ablations.cli import main; rc = main(%r); "
                "print('RESULT', rc, 'tensorflow' in sys.modules, 'keras' in sys.modules, "
                "'pandas' in sys.modules, round(time.time() - t, 2))" % args)
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(root), "PATH": ""})
        result = out.stdout.split("RESULT")[1].split()
        assert result[:4] == ["0", "False", "False", "False"], (args, out.stdout[-500:])
        assert out.stderr == ""


def test_zoo_lists_activation_and_initializer_options(capsys) -> None:
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "negative_slope=0.01" in out and "gain=1.0, tol=0.1, max_iter=10" in out


def test_verbose_is_accepted_before_and_after_the_command(quickstart: Path) -> None:
    assert main(["--verbose", "validate", str(quickstart)]) == 0
    assert main(["validate", str(quickstart), "--verbose"]) == 0


@pytest.mark.slow  # 8 s (a subprocess importing TensorFlow); the CLI's own output is checked by the other tests here
def test_tensorflow_is_imported_silently(capfd) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import ablations; from ablations.quiet import import_tensorflow; import_tensorflow(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": ""})
    assert out.stdout.strip() == "ok" and out.stderr == "", out.stderr


def test_logs_get_one_line_per_arm_and_no_progress_bars() -> None:
    import io

    from rich.console import Console

    from ablations.ui import SweepUI

    buf = io.StringIO()
    ui = SweepUI(Console(file=buf, width=200))  # not a terminal, as in a log
    assert not ui.live
    ui.start(2)
    for i in range(2):
        arm = type("A", (), {"id": f"arm{i}"})()
        ui.arm_done(arm, {"status": "completed", "final": {"loss": 0.5}}, skipped=i == 1)
    ui.stop()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] completed") and lines[1].startswith("[2/2] = arm1")
    assert "━" not in buf.getvalue() and "sweep" not in buf.getvalue()


def test_the_progress_display_needs_no_import_on_its_thread(monkeypatch) -> None:
    """rich's refresh thread once died importing rich.markup under etils' lazy-import hooks: everything it
    renders with must already be imported. Any rich import after ablations.ui is refused here."""
    import io
    import sys
    import threading
    import time

    from rich.console import Console

    import ablations.ui as ui_module

    class NoLateRich:
        def find_spec(self, name, path=None, target=None):
            if name.startswith("rich"):
                raise ImportError(f"late import of {name}")
            return None

    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    monkeypatch.setattr(sys, "meta_path", [NoLateRich(), *sys.meta_path])
    ui = ui_module.SweepUI(Console(file=io.StringIO(), force_terminal=True, width=100))
    assert ui.live
    ui.start(1)
    task = ui.progress.add_task("  model=[bold]x", total=10)
    for i in range(10):
        ui.progress.update(task, completed=i + 1)
        time.sleep(0.03)
    ui.arm_done(type("A", (), {"id": "a[1]"})(), {"status": "completed", "verdicts": [
        {"kind": "vanishing", "message": "blocks [0-3] receive < 0.001"}]}, False)
    ui.stop()
    assert errors == []


# ------------------------------------------------------------------------------------------ exit codes


def _cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\nmodel: {depth: 1, width: 8}\ntrain: {epochs: 1, steps_per_epoch: 1}\n")
    return cfg


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, capsys, monkeypatch) -> None:
    import ablations.sweep

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablations.sweep, "run_sweep", interrupted)
    assert main(["run", str(_cfg(tmp_path)), "--out", str(tmp_path), "--no-report"]) == 130
    out = capsys.readouterr().out
    assert "interrupted" in out and "rerun the same command to resume" in out and "Traceback" not in out


def test_a_full_disk_while_locking_is_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    import errno
    import os

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    assert main(["run", str(_cfg(tmp_path)), "--out", str(tmp_path / "runs"), "--no-report"]) == 2
    out = capsys.readouterr().out
    assert "No space left on device" in out and ".lock" in out and "rerun" in out


def test_an_unwritable_report_folder_is_refused_before_training(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["run", str(_cfg(tmp_path)), "--out", str(tmp_path / "runs"), "--report", str(blocker / "rep")])
    assert code == 2
    assert "not writable" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_report_of_a_damaged_or_missing_run_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    run.mkdir()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert "not a run folder" in capsys.readouterr().out
    (run / "experiment.yaml").write_text("name: r\ngrid: {model.depth: [1, 2\n")
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    out = capsys.readouterr().out
    assert f"{run / 'experiment.yaml'} is damaged" in out and "Traceback" not in out
    (run / "experiment.yaml").write_text("name: r\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["report", str(run), "--out", str(blocker / "rep")]) == 2
    assert "cannot write the report to" in capsys.readouterr().out
