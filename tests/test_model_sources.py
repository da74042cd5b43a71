"""Models from outside the zoo in a YAML run: your builder (``module:function``), a Keras application, a saved
``.keras`` file; validated like zoo models, trained and probed (blocks found by discovery), ablatable."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.config import ConfigError, parse_experiment

BUILDER = textwrap.dedent('''
    import keras

    def sigmoid_mlp(*, input_shape, num_outputs, width: int = 16, depth: int = 3, activation: str = "sigmoid"):
        """A plain Keras Sequential MLP with fused activations."""
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten()] +
                                [keras.layers.Dense(width, activation=activation) for _ in range(depth)] +
                                [keras.layers.Dense(num_outputs)])
''')


@pytest.fixture
def builder_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mymodels_src.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymodels_src"
    sys.modules.pop("mymodels_src", None)


def tiny(model: dict, **extra) -> dict:
    return {"name": "own", "model": model, "train": {"epochs": 1, "steps_per_epoch": 3},
            "data": {"batch_size": 16}, **extra}


def test_an_importable_builder_is_validated_from_its_signature_without_importing_it(builder_module: str) -> None:
    exp = parse_experiment(tiny({"arch": f"{builder_module}:sigmoid_mlp", "width": 8},
                                grid={"model.activation": ["sigmoid", "relu"]}))
    assert len(exp.arms()) == 2 and builder_module not in sys.modules  # read with ast, not imported
    with pytest.raises(ConfigError, match="has no option 'widht'. Did you mean 'width'"):
        parse_experiment(tiny({"arch": f"{builder_module}:sigmoid_mlp", "widht": 8}))
    with pytest.raises(ConfigError, match="unknown function in mymodels_src 'nope'"):
        parse_experiment(tiny({"arch": f"{builder_module}:nope"}))
    with pytest.raises(ConfigError, match="unknown model module 'no_such_module_x'"):
        parse_experiment(tiny({"arch": "no_such_module_x:f"}))


def test_an_importable_builder_trains_and_is_probed(builder_module: str, tfds_dir: str, tmp_path: Path) -> None:
    from ablations.runner import run_arm

    arm = parse_experiment(tiny({"arch": f"{builder_module}:sigmoid_mlp", "width": 8, "depth": 6})).arms()[0]
    summary = run_arm(arm, tmp_path / "arm")
    assert summary["status"] == "completed", summary
    blocks = pd.read_parquet(tmp_path / "arm" / "blocks.parquet")
    params = pd.read_parquet(tmp_path / "arm" / "params.parquet")
    assert blocks["depth"].nunique() == 6  # graph rule: one block per fused Dense layer
    series = params[params["block_kernel"] & (params["step"] == 0)]
    assert (series["layer"] == series["block"]).all() and len(series) == 6
    # Six fused sigmoid layers: the first block's kernel gets a small share of the last one's gradient.
    assert 0 < summary["ratio_init"] < 0.05 and summary["decay_rate_init"] > 0.1


def test_a_saved_model_file_trains(tfds_dir: str, tmp_path: Path) -> None:
    import keras

    from ablations.runner import run_arm

    path = tmp_path / "mine.keras"
    keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(8, activation="tanh"),
                      keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(10)]).save(path)
    with pytest.raises(ConfigError, match="takes no arch and no builder options"):
        parse_experiment(tiny({"file": str(path), "width": 3}))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_experiment(tiny({"file": str(tmp_path / "missing.keras")}))
    arm = parse_experiment(tiny({"file": str(path)}, grid={"train.optimizer.learning_rate": [0.1, 0.01]})).arms()[0]
    summary = run_arm(arm, tmp_path / "arm")
    assert summary["status"] == "completed", summary
    assert pd.read_parquet(tmp_path / "arm" / "params.parquet")["layer"].nunique() == 3


@pytest.mark.slow  # a keras.applications model trained (~20 s); discovery on the applications stays in the default suite
def test_a_keras_application_trains_on_digits(tfds_dir: str, tmp_path: Path) -> None:
    from ablations.runner import run_arm

    with pytest.raises(ConfigError, match="weights must be null"):
        parse_experiment(tiny({"arch": "keras_applications/MobileNetV2", "weights": "imagenet"}))
    arm = parse_experiment(tiny({"arch": "keras_applications/MobileNetV2", "alpha": 0.35},
                                train={"epochs": 1, "steps_per_epoch": 2})).arms()[0]
    summary = run_arm(arm, tmp_path / "arm")
    assert summary["status"] == "completed", summary
    blocks = pd.read_parquet(tmp_path / "arm" / "blocks.parquet")
    names = blocks.drop_duplicates("depth").sort_values("depth")["block"].tolist()
    assert len(names) == 17 and names[0].endswith("expanded_conv") and names[-1].endswith("block_16")
    assert np.isfinite(summary["decay_rate_init"])
    summaries = json.loads((tmp_path / "arm" / "summary.json").read_text())
    assert summaries["status"] == "completed"
