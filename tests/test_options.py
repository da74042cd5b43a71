"""Model options are checked before anything is built, without TensorFlow: name, type, range, and whether
the chosen builder, activation, initializer or norm uses them (``zoo.check_options``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from zoo.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


def problem(arch: str, **opts) -> zoo.BadOptionError:
    with pytest.raises(zoo.BadOptionError) as info:
        zoo.check_options(arch, opts)
    return info.value


@pytest.mark.parametrize("depth", [0, -3])
@pytest.mark.parametrize("arch", ["plain_mlp", "resnet_cnn", "lstm", "transformer"])
def test_depth_below_one_is_refused(arch: str, depth: int) -> None:
    err = problem(arch, depth=depth)
    assert err.option == "depth" and f"depth must be >= 1, got {depth}" in str(err)


def test_a_misspelt_activation_option_names_the_close_match() -> None:
    err = problem("plain_mlp", activation="leaky_relu", activation_options={"negative_slop": 0.3})
    assert err.option == "activation_options.negative_slop"
    assert "activation 'leaky_relu' has no option 'negative_slop'" in str(err)
    assert "Did you mean 'negative_slope'?" in str(err)


def test_an_option_the_chosen_activation_ignores_is_refused() -> None:
    err = problem("plain_mlp", activation="relu", activation_options={"negative_slope": 0.3})
    assert "activation 'relu' has no option 'negative_slope' (takes no options)" in str(err)
    zoo.check_options("plain_mlp", {"activation": "leaky_relu", "activation_options": {"negative_slope": 0.3}})
    zoo.check_options("plain_mlp", {"activation": "prelu", "activation_options": {"alpha_init": 0.1}})


def test_initializer_options_are_those_of_the_chosen_initializer() -> None:
    err = problem("plain_mlp", initializer="orthogonal", initializer_options={"gian": 5.0})
    assert "Did you mean 'gain'?" in str(err) and err.option == "initializer_options.gian"
    # glorot_uniform ignores a gain: a grid over it would train identical arms.
    err = problem("plain_mlp", initializer_options={"gain": 5.0})
    assert "initializer 'glorot_uniform' has no option 'gain'" in str(err)
    err = problem("plain_mlp", initializer="variance_scaling", initializer_options={"distribution": "norml"})
    assert "Did you mean 'normal'?" in str(err)
    assert "scale must be > 0" in str(problem("plain_mlp", initializer="variance_scaling",
                                              initializer_options={"scale": 0.0}))
    zoo.check_options("plain_mlp", {"initializer": "lsuv", "initializer_options": {"tol": 0.1, "max_iter": 5}})


def test_norm_settings_the_chosen_norm_ignores_are_refused() -> None:
    assert "needs norm: group" in str(problem("plain_mlp", norm="batch", norm_groups=4))
    assert "a norm other than none" in str(problem("resnet_mlp", norm_position="post_act"))
    zoo.check_options("plain_mlp", {"norm": "group", "norm_groups": 4})
    zoo.check_options("plain_mlp", {"norm": "batch", "norm_groups": 8})  # the default is never an error
    with pytest.raises(UnknownNameError, match="unknown normalization 'batchnorm'"):
        zoo.check_options("plain_mlp", {"norm": "batchnorm"})


@pytest.mark.parametrize("arch,opts,needle", [
    ("plain_mlp", {"width": 3.0}, "width must be an integer, got 3.0"),
    ("plain_mlp", {"dropout": "1e-3"}, "YAML reads 1e-3 as a string"),
    ("plain_mlp", {"dropout": 1.0}, "dropout must be < 1"),
    ("plain_mlp", {"dropout": float("nan")}, "must be a finite number"),
    ("plain_mlp", {"bias_init_std": True}, "bias_init_std must be a number"),
    ("resnet_mlp", {"branch_scale": "half"}, "branch_scale must be a number or 'inv_sqrt_depth'"),
    ("lstm", {"forget_bias": "ones"}, "forget_bias must be a number or 'unit'"),
    ("simple_rnn", {"activation": "leaky_relu"}, "activation must be one of tanh"),
    ("simple_rnn", {"spectral_radius": 0.9, "recurrent_gain": 2.0}, "recurrent_gain: 2.0' has no effect"),
    ("densenet_mlp", {"compression": 0.5}, "stages > 1"),
    ("transformer", {"d_model": 10, "heads": 4}, "must be divisible by 'heads'"),
    ("transformer", {"norm_position": "pre_act"}, "norm_position must be one of pre, post, none"),
    ("stochastic_depth_mlp", {"survival_prob": 0.0}, "survival_prob must be > 0"),
])
def test_types_ranges_and_choices(arch: str, opts: dict, needle: str) -> None:
    assert needle in str(problem(arch, **opts))


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'relu'"):
        zoo.check_options("plain_mlp", {"activation": "rleu"})
    with pytest.raises(UnknownNameError, match="unknown model 'resnet_mpl'"):
        zoo.check_options("resnet_mpl", {})


def test_every_shipped_bundle_passes() -> None:
    zoo.check_options("resnet_mlp", {"depth": 16, "branch_scale": "inv_sqrt_depth", "activation": "sigmoid"})
    zoo.check_options("transformer", {"norm_position": "none", "residual": "rezero", "d_model": 32, "heads": 4})


def test_options_and_families_come_from_the_source_without_tensorflow() -> None:
    code = ("import sys, zoo; n = zoo.names(); o = zoo.options('lstm'); zoo.check_options('lstm', {'units': 4}); "
            "print(len(n), o['forget_bias'], zoo.family('gru'), 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.split() == ["16", "('unit',", "'float", "|", "str')", "rnn", "False", "False"]
