"""Experiment config: parsing the real quickstart, grid expansion, overrides and loud, specific errors."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ablations.config import (
    ConfigError,
    DataConfig,
    Experiment,
    apply_overrides,
    load_experiment,
    parse_experiment,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+,=~-]*$")


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def config_error(tmp_path: Path, text: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------ quickstart


def quickstart_raw() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def test_quickstart_expands_to_24_unique_arms():
    raw = quickstart_raw()
    exp = load_experiment(QUICKSTART)
    assert exp.name == "quickstart"
    assert exp.seeds == [0, 1]
    assert list(exp.grid) == ["model", "model.activation", "model.depth"]
    assert exp.grid["model.activation"] == ["sigmoid", "relu"] and exp.grid["model.depth"] == [4, 8, 16]
    arms = exp.arms()
    assert len(arms) == 24 == math.prod(len(v) for v in raw["grid"].values()) * len(raw["seeds"])
    ids = [a.id for a in arms]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "model=plain_mlp,activation=sigmoid,depth=4,seed=0"
    assert ids[1] == "model=plain_mlp,activation=sigmoid,depth=4,seed=1"  # seeds innermost
    assert ids[2] == "model=plain_mlp,activation=sigmoid,depth=8,seed=0"
    # Every (arch, activation, depth, seed) combination appears exactly once.
    combos = [(a.config.model.arch, a.config.model.options()["activation"], a.config.model.options()["depth"],
               a.config.seed) for a in arms]
    assert sorted(combos) == sorted(itertools.product(["plain_mlp", "resnet_mlp"], ["sigmoid", "relu"],
                                                      [4, 8, 16], [0, 1]))
    for arm in arms:
        assert SAFE_ID.match(arm.id) and "/" not in arm.id
        assert arm.id.endswith(f",seed={arm.config.seed}")
        assert f"depth={arm.config.model.options()['depth']}," in arm.id
        assert arm.config.arm_id == arm.id
        assert arm.config.experiment == "quickstart"


def test_quickstart_arm_configs_are_resolved():
    raw = quickstart_raw()
    arms = load_experiment(QUICKSTART).arms()
    cfg = arms[-1].config  # last grid value of every axis, last seed
    bundle = raw["grid"]["model"][-1]
    assert cfg.seed == 1
    assert cfg.values == {"model": bundle, "model.activation": "relu", "model.depth": 16}
    # The bundled mapping merges into the model section: the base options survive.
    assert cfg.model.arch == bundle["arch"] == "resnet_mlp"
    opts = cfg.model.options()
    assert opts["depth"] == 16 and opts["activation"] == "relu"
    assert opts["width"] == raw["model"]["width"] and opts["initializer"] == raw["model"]["initializer"]
    for key, value in bundle.items():
        if key != "arch":
            assert opts[key] == value
    assert cfg.data.name == "digits" and cfg.data.batch_size == raw["data"]["batch_size"]
    assert cfg.train.epochs == raw["train"]["epochs"]
    assert cfg.train.steps_per_execution == raw["train"]["steps_per_execution"]
    assert cfg.train.optimizer.name == raw["train"]["optimizer"]["name"]
    assert cfg.train.optimizer.learning_rate == raw["train"]["optimizer"]["learning_rate"]
    assert cfg.train.optimizer.momentum == raw["train"]["optimizer"]["momentum"]
    assert cfg.capture.every == raw["capture"]["every"]
    # Defaults fill what the file leaves out.
    assert cfg.capture.drain_every == "auto" and cfg.runtime.deterministic is True


def test_arm_ids_are_stable_across_expansions():
    a = [(arm.id, arm.config.model_dump()) for arm in load_experiment(QUICKSTART).arms()]
    b = [(arm.id, arm.config.model_dump()) for arm in load_experiment(QUICKSTART).arms()]
    assert a == b


def test_config_layer_does_not_import_tensorflow():
    code = "import sys, ablations.config, zoo; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "False False"


# ------------------------------------------------------------------------------------------ grid expansion


def test_grid_count_is_product_times_seeds(tmp_path):
    path = write(tmp_path, """
        name: g
        grid:
          model.width: [8, 16, 32]
          train.optimizer.learning_rate: [0.1, 0.01]
          model.activation: [relu, tanh, sigmoid, gelu]
        seeds: [3, 7]
    """)
    arms = load_experiment(path).arms()
    assert len(arms) == 3 * 2 * 4 * 2
    assert len({a.id for a in arms}) == len(arms)
    assert sorted({a.config.seed for a in arms}) == [3, 7]
    first = arms[0]
    assert first.id == "width=8,learning_rate=0.1,activation=relu,seed=3"
    assert first.config.train.optimizer.learning_rate == 0.1
    assert first.config.model.options()["width"] == 8


def test_no_grid_gives_one_arm_per_seed(tmp_path):
    exp = load_experiment(write(tmp_path, "name: solo\n"))
    assert [a.id for a in exp.arms()] == ["seed=0"]


def test_mapping_axis_bundles_settings_and_merges(tmp_path):
    path = write(tmp_path, """
        name: b
        model:
          arch: plain_mlp
          width: 16
          activation: tanh
        grid:
          model:
            - {arch: plain_mlp}
            - {arch: resnet_mlp, branch_scale: 0.5}
    """)
    arms = load_experiment(path).arms()
    assert [a.id for a in arms] == ["model=plain_mlp,seed=0", "model=resnet_mlp+0.5,seed=0"]
    assert arms[0].config.model.options() == {"width": 16, "activation": "tanh"}
    assert arms[1].config.model.arch == "resnet_mlp"
    assert arms[1].config.model.options() == {"width": 16, "activation": "tanh", "branch_scale": 0.5}


def test_integer_seeds_mean_range(tmp_path):
    exp = load_experiment(write(tmp_path, "name: s\nseeds: 3\n"))
    assert exp.seeds == [0, 1, 2]
    assert [a.id for a in exp.arms()] == ["seed=0", "seed=1", "seed=2"]


def test_same_last_key_uses_full_path_in_ids():
    exp = parse_experiment({"name": "x", "grid": {"data.name": ["digits"], "train.optimizer.name": ["sgd"]}})
    assert [a.id for a in exp.arms()] == ["data.name=digits,train.optimizer.name=sgd,seed=0"]


def test_ids_of_awkward_values_are_filesystem_safe_and_unique():
    exp = parse_experiment({"name": "x", "model": {"activation": "leaky_relu"},
                            "grid": {"data.name": ["a/b", "a:b", "c d"],
                                                  "model.activation_options": [{"negative_slope": 0.1}]}})
    ids = [a.id for a in exp.arms()]
    assert len(ids) == 3 and len(set(ids)) == 3
    for arm_id in ids:
        assert SAFE_ID.match(arm_id), arm_id
        assert "/" not in arm_id and ":" not in arm_id and " " not in arm_id
    assert ids[0].startswith("name=a-b,activation_options=")
    assert ids[1].startswith(ids[0] + "~")  # 'a/b' and 'a:b' slug alike: a digest keeps them apart
    # stable: the same digest every time
    assert ids == [a.id for a in exp.arms()]


def test_long_ids_are_truncated_with_a_digest():
    long_values = ["v" * 200, "v" * 199 + "w"]
    exp = parse_experiment({"name": "x", "grid": {"data.name": long_values}})
    ids = [a.id for a in exp.arms()]
    assert all(len(i) <= 120 for i in ids)
    assert len(set(ids)) == 2
    assert all(SAFE_ID.match(i) for i in ids)


# ------------------------------------------------------------------------------------------ overrides


def test_override_pins_a_grid_axis():
    exp = load_experiment(QUICKSTART, ["train.epochs=1", "model.depth=2"])
    arms = exp.arms()
    assert len(arms) == 8
    assert {a.config.model.options()["depth"] for a in arms} == {2}
    assert {a.config.train.epochs for a in arms} == {1}
    assert arms[0].id == "model=plain_mlp,activation=sigmoid,depth=2,seed=0"


def test_override_with_a_list_replaces_the_axis_and_seeds():
    exp = load_experiment(QUICKSTART, ["model.depth=[2, 3]", "seeds=1"])
    arms = exp.arms()
    assert len(arms) == 2 * 2 * 2 * 1
    assert {a.config.model.options()["depth"] for a in arms} == {2, 3}
    assert {a.config.seed for a in arms} == {0}


def test_grid_override_adds_an_axis():
    exp = load_experiment(QUICKSTART, ["grid.model.width=[8,16]"])
    arms = exp.arms()
    assert len(arms) == 48
    assert exp.grid["model.width"] == [8, 16]
    assert arms[0].id == "model=plain_mlp,activation=sigmoid,depth=4,width=8,seed=0"
    assert {a.config.model.options()["width"] for a in arms} == {8, 16}


def test_override_of_a_plain_key_and_yaml_values():
    raw = apply_overrides({"name": "x"}, ["data.batch_size=16", "data.val_split=null", "model.arch=resnet_mlp"])
    assert raw == {"name": "x", "data": {"batch_size": 16, "val_split": None}, "model": {"arch": "resnet_mlp"}}
    exp = parse_experiment(raw)
    assert exp.data.batch_size == 16 and exp.data.val_split is None
    # the input dict is not modified
    original = {"name": "x", "grid": {"model.depth": [1, 2]}}
    apply_overrides(original, ["model.depth=3"])
    assert original == {"name": "x", "grid": {"model.depth": [1, 2]}}


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as info:
        load_experiment(QUICKSTART, ["train.epochs"])
    assert str(info.value) == "--set 'train.epochs': expected key.path=value, e.g. train.epochs=1"


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match=r"--set 'train.epochs=\[1': the value is not valid YAML"):
        load_experiment(QUICKSTART, ["train.epochs=[1"])


def test_override_below_a_scalar(tmp_path):
    msg = config_error(tmp_path, "name: a\ntrain: 3\n", ["train.epochs=2"])
    assert msg == "--set 'train.epochs=2': 'train' is not a section, cannot set 'train.epochs'"


def test_override_is_validated_like_the_file():
    with pytest.raises(ConfigError) as info:
        load_experiment(QUICKSTART, ["train.epochs=0"])
    assert "'train.epochs': Input should be greater than 0 (got 0)" in str(info.value)


# ------------------------------------------------------------------------------------------ errors


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    msg = config_error(tmp_path, """
        name: a
        data:
          name: digits
          batch_size: 64
            oops: 1
    """)
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:5:")
    assert "YAML syntax error" in msg and "mapping values are not allowed here" in msg


def test_unknown_key_suggests_and_lists_allowed(tmp_path):
    msg = config_error(tmp_path, """
        name: a
        train:
          epoch: 2
    """)
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:3: unknown key 'train.epoch'.")
    assert "Did you mean 'epochs'?" in msg
    assert "Allowed keys under 'train': epochs, steps_per_epoch, optimizer, loss, steps_per_execution, jit_compile" in msg


def test_unknown_top_level_key(tmp_path):
    msg = config_error(tmp_path, "name: a\ngird:\n  model.depth: [2]\n")
    assert ":2: unknown key 'gird'. Did you mean 'grid'? Allowed keys: name, description" in msg


def test_unknown_nested_key(tmp_path):
    msg = config_error(tmp_path, """
        name: a
        train:
          optimizer:
            lr: 0.1
    """)
    assert ":4: unknown key 'train.optimizer.lr'." in msg
    assert "Allowed keys under 'train.optimizer': name, learning_rate, momentum" in msg


@pytest.mark.parametrize("text,field,value,line", [
    ("name: a\ntrain:\n  epochs: 0\n", "train.epochs", "0", 3),
    ("name: a\ntrain:\n  optimizer:\n    learning_rate: -1\n", "train.optimizer.learning_rate", "-1", 4),
    ("name: a\ndata:\n  batch_size: 0\n", "data.batch_size", "0", 3),
    ("name: a\ntrain:\n  optimizer:\n    momentum: 1.0\n", "train.optimizer.momentum", "1.0", 4),
    ("name: a\ntrain:\n  epochs: many\n", "train.epochs", "'many'", 3),
    ("name: a\ncapture:\n  drain_every: 0\n", "capture.drain_every", "0", 3),
    ("name: a\ncapture:\n  drain_every: sometimes\n", "capture.drain_every", "'sometimes'", 3),
])
def test_wrong_value_names_field_and_value(tmp_path, text, field, value, line):
    msg = config_error(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:{line}: '{field}': ")
    assert msg.endswith(f"(got {value})")


def test_drain_every_says_both_forms_once(tmp_path):
    msg = config_error(tmp_path, "name: a\ncapture:\n  drain_every: 2.5\n")
    assert msg.count("not a drain interval: give a number of steps > 0, or auto") == 1 and "literal" not in msg
    assert parse_experiment({"name": "a", "capture": {"drain_every": 32}}).arms()[0].config.capture.drain_every == 32


def test_unknown_optimizer_lists_allowed(tmp_path):
    msg = config_error(tmp_path, "name: a\ntrain:\n  optimizer:\n    name: adamm\n")
    assert "'train.optimizer.name'" in msg and "(got 'adamm')" in msg
    for name in ("sgd", "adam", "adamw", "rmsprop", "adagrad"):
        assert f"'{name}'" in msg


def test_two_clipping_modes_are_rejected(tmp_path):
    msg = config_error(tmp_path, "name: a\ntrain:\n  optimizer:\n    clipnorm: 1\n    global_clipnorm: 1\n")
    assert "set at most one of clipnorm and global_clipnorm" in msg


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_zero_seeds(tmp_path, seeds):
    msg = config_error(tmp_path, f"name: a\nseeds: {seeds}\n")
    assert ":2: 'seeds'" in msg and "an integer number of seeds must be > 0" in msg


def test_empty_grid_axis(tmp_path):
    msg = config_error(tmp_path, "name: a\ngrid:\n  model.depth: []\n")
    assert "grid axis 'model.depth' has no values" in msg


@pytest.mark.parametrize("axis", ["name", "seeds", "description"])
def test_grid_on_name_or_seeds(tmp_path, axis):
    msg = config_error(tmp_path, f"name: a\ngrid:\n  {axis}: [a, b]\n")
    assert f"grid axis '{axis}' cannot be varied" in msg


def test_bad_grid_value_is_reported_with_the_arm(tmp_path):
    msg = config_error(tmp_path, "name: a\ngrid:\n  train.epochs: [1, 0]\n")
    assert "arm epochs=0,seed=0" in msg
    assert "'train.epochs': Input should be greater than 0 (got 0) [value from grid]" in msg


def test_bad_name_and_top_level(tmp_path):
    msg = config_error(tmp_path, "name: a b\n")
    assert "'name': String should match pattern" in msg and "(got 'a b')" in msg
    assert "the top level must be a mapping" in config_error(tmp_path, "- a\n- b\n")
    assert "'name' is required" in config_error(tmp_path, "description: no name\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml"):
        load_experiment(tmp_path / "nope.yaml")


def test_data_config_defaults_and_strictness():
    cfg = DataConfig()
    assert cfg.name == "digits" and cfg.batch_size == 64 and cfg.download is True
    with pytest.raises(ValueError):
        DataConfig(batch_sise=3)
    with pytest.raises(ValueError):
        Experiment(name="a", seeds=True)  # a bool is not a seed count


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    """The configs the README points to parse, expand and name only known models and options."""
    import zoo
    from ablations.config import load_experiment

    exp = load_experiment(path, [])
    arms = exp.arms()
    assert arms
    for arm in arms:
        zoo.check_options(arm.config.model.arch, arm.config.model.options())


def test_jit_compile_with_op_determinism_is_refused(tmp_path):
    msg = config_error(tmp_path, """
        name: a
        train:
          jit_compile: true
    """)
    assert "train.jit_compile: true has no effect while runtime.deterministic is true" in msg
    assert "set runtime.deterministic: false" in msg
    exp = load_experiment(write(tmp_path, "name: a\ntrain: {jit_compile: true}\nruntime: {deterministic: false}\n"))
    assert exp.arms()[0].config.train.jit_compile is True


# ------------------------------------------------------------------------------------------ never a wrong result


@pytest.mark.parametrize("seeds,needle", [
    ("[0, 0]", "seed 0 is listed twice"),
    ("[1, -1]", "seed -1 is out of range"),
    ("[]", "seeds is empty"),
])
def test_bad_seed_lists(tmp_path, seeds, needle):
    msg = config_error(tmp_path, f"name: a\nseeds: {seeds}\n")
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:2: 'seeds': ") and needle in msg


@pytest.mark.parametrize("depth", [0, -3])
def test_depth_below_one_is_a_config_error_with_its_line(tmp_path, depth):
    msg = config_error(tmp_path, f"name: a\nmodel:\n  arch: plain_mlp\n  depth: {depth}\n")
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:4: arm seed=0: 'model.depth': depth must be >= 1")


def test_model_option_errors_name_the_grid_line_and_the_arm(tmp_path):
    msg = config_error(tmp_path, """
        name: a
        grid:
          model.initializer_options.gain: [1.0, 5.0]
    """)
    assert msg.startswith(f"{tmp_path / 'exp.yaml'}:3: arm gain=1.0,seed=0: 'model.initializer_options.gain': ")
    assert "initializer 'glorot_uniform' has no option 'gain'" in msg and msg.endswith("[value from grid]")
    msg = config_error(tmp_path, "name: a\nmodel: {activation: leaky_relu, activation_options: {negative_slop: 1}}\n")
    assert ":2: " in msg and "Did you mean 'negative_slope'?" in msg


@pytest.mark.parametrize("text,needle", [
    ("train: {optimizer: {name: adam, momentum: 0.9}}", "'momentum: 0.9' has no effect with name 'adam'"),
    ("train: {optimizer: {name: adagrad, nesterov: true}}", "'nesterov: True' has no effect with name 'adagrad'"),
    ("train: {optimizer: {schedule: {name: cosine, milestones: [0.3]}}}", "used by step only"),
    ("train: {optimizer: {schedule: {name: step, min_fraction: 0.1}}}", "used by cosine only"),
])
def test_optimizer_and_schedule_settings_the_chosen_one_ignores(tmp_path, text, needle):
    assert needle in config_error(tmp_path, f"name: a\n{text}\n")


def test_a_grid_that_gives_an_optimizer_a_setting_it_ignores_names_the_arm(tmp_path):
    msg = config_error(tmp_path, """
        name: a
        train: {optimizer: {name: sgd, momentum: 0.9}}
        grid:
          train.optimizer.name: [sgd, adam]
    """)
    assert "arm name=adam,seed=0" in msg and "momentum" in msg


def test_grid_keys_never_leave_the_run_folder(tmp_path):
    msg = config_error(tmp_path, "name: a\n", ["grid.model.activation_options./elsewhere/evil=[1]"])
    assert msg.startswith("--set 'grid.model.activation_options./elsewhere/evil=[1]'")
    assert "has no option '/elsewhere/evil'" in msg
    assert "unknown key 'nowhere'" in config_error(tmp_path, "name: a\n", ["grid.nowhere.x=[1]"])
    assert "is not a dotted config key" in config_error(tmp_path, "name: a\n", ["grid.model..depth=[1]"])
    # A real key with characters a folder name must not hold still gives a single, safe path component.
    exp = parse_experiment({"name": "x", "model": {"activation": "leaky_relu"},
                            "grid": {"model.activation_options": [{"negative_slope": 0.1}], "data.name": ["../x/y"]}})
    for arm in exp.arms():
        assert SAFE_ID.match(arm.id) and "/" not in arm.id and not arm.id.startswith(".")
        assert len(arm.id.encode()) <= 255 and Path(arm.id).name == arm.id


def test_the_number_of_arms_is_capped_before_expanding(tmp_path):
    import time

    text = "name: big\ngrid:\n  model.width: [" + ", ".join(str(i) for i in range(1, 101)) + "]\n" \
           "  model.depth: [" + ", ".join(str(i) for i in range(1, 101)) + "]\nseeds: 100\n"
    t0 = time.time()
    msg = config_error(tmp_path, text)
    assert time.time() - t0 < 5
    assert "the grid expands to 1,000,000 arms (100 model.width x 100 model.depth x 100 seeds)" in msg
    assert "more than max_arms = 10,000" in msg and "--set max_arms=N" in msg
    assert "more than max_arms" in config_error(tmp_path, "name: a\nseeds: 100000000\n")
    exp = load_experiment(write(tmp_path, "name: a\nmax_arms: 3\nseeds: 3\n"))
    assert len(exp.arms()) == 3
    assert "more than max_arms = 2" in config_error(tmp_path, "name: a\nseeds: 3\n", ["max_arms=2"])


def test_arms_are_expanded_once(monkeypatch):
    import ablations.config.experiment as experiment
    from ablations.cli import main

    calls = []
    real = experiment._expand
    monkeypatch.setattr(experiment, "_expand", lambda *a: calls.append(1) or real(*a))
    assert main(["validate", str(QUICKSTART)]) == 0
    assert len(calls) == 1


def test_yaml_alias_bombs_are_refused_quickly(tmp_path):
    import time

    lol = '["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for where in ("description:\n", "model:\n  activation_options:\n"):
        indent = "  " if where.startswith("description") else "    "
        lines = [f"{indent}- &a0 {lol}"] if where.startswith("description") else [f"{indent}a0: &a0 {lol}"]
        for i in range(1, 9):
            refs = ",".join([f"*a{i - 1}"] * 9)
            lines.append(f"{indent}- &a{i} [{refs}]" if where.startswith("description") else f"{indent}a{i}: &a{i} [{refs}]")
        t0 = time.time()
        msg = config_error(tmp_path, "name: bomb\n" + where + "\n".join(lines) + "\n")
        assert time.time() - t0 < 5
        assert "expands to more than 200,000 values" in msg and "alias" in msg
    msg = config_error(tmp_path, "name: a\ndescription: &r [*r]\n")
    assert "recursive" in msg


def test_deep_nesting_is_a_config_error(tmp_path):
    assert "nested" in config_error(tmp_path, "name: d\ndescription: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "nested more than 50 levels" in config_error(tmp_path, "name: d\ndescription: " + "[" * 60 + "]" * 60 + "\n")


def test_duplicate_keys_name_both_lines(tmp_path):
    msg = config_error(tmp_path, "name: d\ntrain:\n  epochs: 2\n  epochs: 3\n")
    assert msg == (f"{tmp_path / 'exp.yaml'}:4: duplicate key 'epochs' under 'train' (first at line 3): YAML would "
                   f"keep only the last one; remove one of them")
    msg = config_error(tmp_path, "name: d\ngrid:\n  model:\n    - {norm: batch, norm: layer}\n")
    assert ":4: duplicate key 'norm'" in msg


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: d\ndescription: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml:2: not UTF-8 text \(byte 0xe9"):
        load_experiment(path)


def test_a_name_too_long_for_a_folder_is_a_config_error(tmp_path):
    msg = config_error(tmp_path, "name: " + "x" * 300 + "\n")
    assert "'name': String should have at most 255 characters" in msg and len(msg) < 300


def test_set_errors_name_the_set_not_the_file_line(tmp_path):
    text = "name: a\ntrain:\n  epochs: 3\n"
    msg = config_error(tmp_path, text, ["train.epochs=0"])
    assert msg.startswith("--set 'train.epochs=0': 'train.epochs': Input should be greater than 0")
    msg = config_error(tmp_path, text, ["grid.model.depth=[2, 0]"])
    assert msg.startswith("--set 'grid.model.depth=[2, 0]': arm depth=0,seed=0: 'model.depth'")
    msg = config_error(tmp_path, text, ["model.depth="])
    assert msg == "--set 'model.depth=': no value after '='; write model.depth=null for null or model.depth=\"\" " \
                  "for an empty string"


def test_per_point_settings_change_only_their_points(tmp_path):
    exp = load_experiment(write(tmp_path, """
        name: p
        grid:
          model.activation: [relu, tanh]
        per_point:
          - point: {model.activation: tanh}
            set: {train.optimizer.learning_rate: 0.5}
        seeds: 2
    """))
    lrs = {a.id: a.config.train.optimizer.learning_rate for a in exp.arms()}
    assert lrs == {"activation=relu,seed=0": 0.01, "activation=relu,seed=1": 0.01,
                   "activation=tanh,seed=0": 0.5, "activation=tanh,seed=1": 0.5}
    base = "name: p\ngrid:\n  model.activation: [relu]\nper_point:\n  - point: {%s}\n    set: {%s}\n"
    assert "'model.depth' is not a grid axis" in config_error(tmp_path, base % ("model.depth: 2", "model.width: 4"))
    assert "'sigmoid' is not a value of grid axis" in config_error(
        tmp_path, base % ("model.activation: sigmoid", "model.width: 4"))
    assert "cannot be set per point" in config_error(tmp_path, base % ("model.activation: relu", "seeds: 2"))
    assert "width must be >= 1" in config_error(tmp_path, base % ("model.activation: relu", "model.width: 0"))


def test_per_arm_search_of_a_grid_axis_is_refused(tmp_path):
    msg = config_error(tmp_path, """
        name: s
        grid:
          model.depth: [2, 4]
        search:
          per_arm: true
          space: {model.depth: {int: [1, 3]}}
    """)
    assert "search.space 'model.depth' is also a grid axis" in msg
