"""``ablate theory``: the tables are computed with autodiff from the registered activation layers; checked
here against closed forms derived by hand (and against options that change the layer)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ablations import theory
from ablations.cli import EXIT_OK, EXIT_USAGE, main


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return theory.activation_table().set_index("activation")


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_every_registered_activation_has_a_row(table):
    from zoo.activations import ACTIVATIONS

    assert sorted(table.index) == ACTIVATIONS.names()


def test_maximum_derivatives_match_closed_forms(table):
    assert table.loc["sigmoid", "max_derivative"] == pytest.approx(0.25, abs=1e-9)  # sigma' = s(1-s) <= 1/4
    assert abs(table.loc["sigmoid", "argmax_z"]) < 1e-3
    assert table.loc["tanh", "max_derivative"] == pytest.approx(1.0, abs=1e-8)
    assert table.loc["hard_sigmoid", "max_derivative"] == pytest.approx(1 / 6, abs=1e-9)  # relu6(x+3)/6
    # SELU: lambda * alpha * e^z just below 0 (Klambauer et al. 2017 constants).
    lam, alpha = 1.0507009873554805, 1.6732632423543772
    assert table.loc["selu", "max_derivative"] == pytest.approx(lam * alpha, rel=1e-3)
    # GELU' = Phi(z) + z phi(z): extrema at z = +-sqrt(2).
    r2 = math.sqrt(2)
    assert table.loc["gelu", "derivative_max"] == pytest.approx(_Phi(r2) + r2 * _phi(r2), abs=1e-6)
    assert table.loc["gelu", "derivative_min"] == pytest.approx(_Phi(-r2) - r2 * _phi(r2), abs=1e-6)
    # swish' = s(z)(1 + z(1 - s(z))): maximise numerically in NumPy, independently of TensorFlow.
    z = np.linspace(0, 5, 500001)
    s = 1 / (1 + np.exp(-z))
    assert table.loc["swish", "max_derivative"] == pytest.approx(float((s * (1 + z * (1 - s))).max()), abs=1e-7)


def test_derivative_ranges_and_saturation(table):
    assert (table.loc["relu", "derivative_min"], table.loc["relu", "derivative_max"]) == (0.0, 1.0)
    assert table.loc["leaky_relu", "derivative_min"] == pytest.approx(0.01)
    assert table.loc["prelu", "derivative_min"] == pytest.approx(0.25)  # He et al. 2015's initial slope
    assert table.loc["linear", "derivative_min"] == table.loc["linear", "derivative_max"] == 1.0
    for name in ("sigmoid", "tanh"):
        assert table.loc[name, "negative_side"].startswith("asymptotic")
        assert table.loc[name, "positive_side"].startswith("asymptotic")
    assert table.loc["hard_sigmoid", "negative_side"].startswith("hard")
    assert table.loc["hard_sigmoid", "positive_side"].startswith("hard")
    assert table.loc["relu", "negative_side"].startswith("hard")
    assert table.loc["relu", "positive_side"].startswith("none")
    assert table.loc["elu", "negative_side"].startswith("asymptotic")
    assert table.loc["leaky_relu", "negative_side"] == "none (d -> 0.01)"
    # sigmoid' >= 5% of 1/4 where s(1-s) >= 1/80: s = (1 + sqrt(1 - 4/80))/2, z = logit(s).
    s = (1 + math.sqrt(1 - 4 / 80)) / 2
    edge = math.log(s / (1 - s))
    assert table.loc["sigmoid", "live_to"] == pytest.approx(edge, abs=2e-4)
    assert table.loc["sigmoid", "live_from"] == pytest.approx(-edge, abs=2e-4)
    assert table.loc["relu", "live_to"] == math.inf


def test_rows_come_from_the_layer_and_its_options():
    row = theory.activation_row("leaky_relu", negative_slope=0.3)
    assert row["derivative_min"] == pytest.approx(0.3)
    assert row["negative_side"] == "none (d -> 0.3)"
    z = np.array([-2.0, -0.5, 0.5, 3.0])
    a, d = theory.derivative("tanh", z)
    np.testing.assert_allclose(a, np.tanh(z), rtol=1e-12)
    np.testing.assert_allclose(d, 1 - np.tanh(z) ** 2, rtol=1e-12)


def test_attenuation_table():
    att = theory.attenuation_table(["sigmoid", "0.2", "tanh"], [1, 5, 10, 15, 20, 50])
    assert list(att["depth"]) == [1, 5, 10, 15, 20, 50]
    assert list(att.columns) == ["depth", "sigmoid: d=0.25", "d=0.2", "tanh: d=1"]
    np.testing.assert_allclose(att["d=0.2"], [0.2 ** L for L in att["depth"]], rtol=1e-12)
    np.testing.assert_allclose(att["sigmoid: d=0.25"], [0.25 ** L for L in att["depth"]], rtol=1e-6)
    np.testing.assert_allclose(att["tanh: d=1"], 1.0, rtol=1e-6)
    assert att["d=0.2"].iloc[-1] == pytest.approx(1.1259e-35, rel=1e-4)
    np.testing.assert_allclose(theory.attenuation_bound("sigmoid", [2, 4]), [0.0625, 0.00390625], rtol=1e-6)
    for name, d in theory.CLOSED_FORM_MAX_DERIVATIVE.items():  # the report's bound equals the computed one
        assert theory.activation_row(name)["max_derivative"] == pytest.approx(d, rel=1e-8), name
    with pytest.raises(ValueError, match="must be > 0"):
        theory.attenuation_table(["-1"])
    with pytest.raises(ValueError, match="depths must be >= 1"):
        theory.attenuation_table(["0.5"], [0, 1])


def test_cli_theory_prints_and_writes_tables(tmp_path, capsys):
    assert main(["theory", "--activations", "sigmoid", "relu", "--d", "0.5", "sigmoid", "--depths", "1", "3",
                 "--csv", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "sigmoid" in out and "0.25" in out and "0.125" in out  # 0.5^3
    acts = pd.read_csv(tmp_path / "activations.csv")
    assert list(acts["activation"]) == ["sigmoid", "relu"]
    att = pd.read_csv(tmp_path / "attenuation.csv")
    np.testing.assert_allclose(att["d=0.5"], [0.5, 0.125])
    assert main(["theory", "--activations", "sigmod"]) == EXIT_USAGE
    assert "Did you mean 'sigmoid'?" in capsys.readouterr().out
