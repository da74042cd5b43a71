"""The command line: validate, zoo, and clear errors (exit code 2) for bad input."""

from __future__ import annotations

from pathlib import Path

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
