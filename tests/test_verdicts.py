"""The verdict matrix (issue #17): every verdict kind, positive and negative, on every zoo family, for runs
shorter and longer than the diagnose window; values synthesised over each family's real table structure
(tests/verdict_tables.py), so the whole matrix takes seconds.

Every table carries its family's trap (ReZero's alpha = 0 at step 0, stochastic depth's switched-off
blocks), negatives are near misses (just inside each threshold, with the real pathology before the judged
window in long runs), and ``test_each_check_can_fail`` feeds every check the other polarity's input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from ablations.diagnose import verdicts
from verdict_tables import (FAMILIES, HEALTHY, LENGTHS, NOT_CAPTURED, WINDOW, Values, diverge_step, not_captured,
                            synth, template)

MATRIX_LENGTHS = ("short", "long")
KINDS = ("vanishing", "exploding", "non_finite", "stalled", "saturated", "dead_units", "plateau", "rising_loss")
# Recurrent blocks have no activation layer of their own: act_saturation/act_dead are NaN in their real
# tables (test_recurrent_families_have_no_activation_statistics), so no activation verdict can be positive.
RECURRENT = {"simple_rnn", "lstm", "gru"}
ACTIVATION_KINDS = {"saturated", "dead_units"}
SICK = {"vanishing": Values(ratio=1e-5), "exploding": Values(ratio=1e3), "stalled": Values(update=1e-5),
        "saturated": Values(sat=0.95), "dead_units": Values(dead=0.7), "plateau": Values(loss_factor=1.0),
        "rising_loss": Values(loss_factor=1.05)}
# Just inside each threshold (1e-3, 70, 1e-3, 80%, 40%, 1% either way).
NEAR = {"vanishing": Values(ratio=3e-3), "exploding": Values(ratio=20.0), "stalled": Values(update=3e-3),
        "saturated": Values(sat=0.7), "dead_units": Values(dead=0.3), "plateau": Values(loss_factor=0.97),
        "rising_loss": Values(loss_factor=1.003)}
NEAR_GIVES = {"rising_loss": {"plateau"}}  # a 0.3% rise is no change: a plateau, not a rising loss
READS = {"params": {"vanishing", "exploding", "stalled"}, "updates": {"stalled"},
         "activations": {"saturated", "dead_units"}}
REZERO = [f for f in FAMILIES if f.startswith("rezero") or f == "transformer/rezero"]
STOCHASTIC = [f for f in FAMILIES if f.startswith("stochastic_depth")]


def judge(tables: dict[str, pd.DataFrame], at_init: bool = False) -> list[dict[str, Any]]:
    return verdicts(tables["params"], tables["blocks"], tables["history"], {"window": WINDOW}, at_init=at_init)


def kinds(found: list[dict[str, Any]]) -> set[str]:
    return {v["kind"] for v in found}


def positive_tables(kind: str, family: str, length: str) -> dict[str, pd.DataFrame]:
    if kind == "non_finite":  # a NaN loss (short runs) or an Inf gradient norm with a finite loss (long runs)
        return synth(family, length, HEALTHY, diverge="loss" if length == "short" else "grad")
    return synth(family, length, SICK[kind])


def negative_tables(kind: str, family: str, length: str) -> dict[str, pd.DataFrame]:
    if kind == "non_finite":  # NaN in per-block columns (older stores' placeholders), the history finite
        t = synth(family, length, HEALTHY)
        p = t["params"]
        rows = (p["role"] == "block").to_numpy() & (np.random.default_rng(1).random(len(p)) < 0.1)
        t["params"] = p.assign(grad_norm=np.where(rows, np.nan, p["grad_norm"]))
        return t
    return synth(family, length, NEAR[kind], before=SICK[kind])  # long runs: the real thing, before the window


def check_positive(kind: str, length: str, found: list[dict[str, Any]]) -> None:
    want = "exploding" if kind == "non_finite" else kind
    assert kinds(found) == {want}, found
    v = found[0]
    if kind in ("vanishing", "exploding"):
        assert 0 in v["blocks"] and "first/last ratio" in v["message"], v
    elif kind == "non_finite":
        assert f"from step {diverge_step(length)}" in v["message"], v
    elif kind in ("stalled", "saturated", "dead_units"):
        assert v["blocks"] == [0], v
    if kind in ("vanishing", "exploding", "stalled", "saturated", "dead_units") and length == "long":
        assert "over the last 199 steps" in v["message"], v  # the window, not the run (captured every 2nd step)


def check_negative(kind: str, found: list[dict[str, Any]]) -> None:
    assert kinds(found) == NEAR_GIVES.get(kind, set()), found


def _matrix(positive: bool) -> list[Any]:
    out = []
    for kind in KINDS:
        for family in FAMILIES:
            for length in MATRIX_LENGTHS:
                if positive and kind in ACTIVATION_KINDS and family in RECURRENT:
                    continue
                out.append(pytest.param(kind, family, length, id=f"{kind}-{family}-{length}"))
    return out


@pytest.mark.parametrize("kind,family,length", _matrix(True))
def test_positive(kind: str, family: str, length: str) -> None:
    check_positive(kind, length, judge(positive_tables(kind, family, length)))


@pytest.mark.parametrize("kind,family,length", _matrix(False))
def test_negative(kind: str, family: str, length: str) -> None:
    check_negative(kind, judge(negative_tables(kind, family, length)))


@pytest.mark.parametrize("kind", KINDS)
def test_each_check_can_fail(kind: str) -> None:
    """The deliberately wrong input for each check: the other polarity's tables."""
    family = "stochastic_depth_mlp"  # with its trap, so both checks see switched-off blocks
    with pytest.raises(AssertionError):
        check_positive(kind, "short", judge(negative_tables(kind, family, "short")))
    with pytest.raises(AssertionError):
        check_negative(kind, judge(positive_tables(kind, family, "short")))


@pytest.mark.parametrize("family", FAMILIES)
def test_healthy_run_has_no_verdict(family: str) -> None:
    for length in MATRIX_LENGTHS:
        assert judge(synth(family, length, HEALTHY)) == [], (family, length)


# ------------------------------------------------------------------------------------ the families' traps


@pytest.mark.parametrize("family", STOCHASTIC)
def test_stochastic_depth_trap_is_real(family: str) -> None:
    """Without the switched-off rule the same tables give false verdicts and hide a real vanishing: the
    stochastic-depth rows of the matrix can fail."""
    for length in MATRIX_LENGTHS:
        healthy = synth(family, length, HEALTHY)
        blind = {**healthy, "blocks": healthy["blocks"].drop(columns="active")}
        assert "stalled" in kinds(judge(blind)), length  # the last block's median update is 0
        sick = synth(family, length, SICK["vanishing"])
        assert kinds(judge({**sick, "blocks": sick["blocks"].drop(columns="active")})) != {"vanishing"}, length


@pytest.mark.parametrize("family", REZERO)
def test_rezero_at_step_0_is_not_judgeable(family: str) -> None:
    """alpha = 0 leaves every branch tensor without gradient by design: step 0 alone gives no flow verdict
    (it would be `vanishing` if alpha were ignored); from step 1 on the blocks are judged."""
    t = synth(family, "short", HEALTHY)
    first = {k: v[v["step"] == 0] for k, v in t.items()}
    assert (first["params"].loc[first["params"]["role"] == "block", "grad_norm"] == 0).any()
    assert judge(first, at_init=True) == []
    blind = {**first, "blocks": first["blocks"].drop(columns="alpha")}
    assert "vanishing" in kinds(judge(blind, at_init=True))


@pytest.mark.parametrize("family", REZERO + STOCHASTIC)
@pytest.mark.parametrize("length", MATRIX_LENGTHS)
def test_nan_placeholders_of_switched_off_blocks(family: str, length: str) -> None:
    """Older stores hold NaN, not 0, for switched-off blocks: never `exploding`, a real vanishing still found."""
    assert judge(synth(family, length, HEALTHY, placeholder="nan")) == []
    check_positive("vanishing", length, judge(synth(family, length, SICK["vanishing"], placeholder="nan")))


# ----------------------------------------------------------------------------- columns never captured

ALL_SICK = Values(ratio=1e-5, update=1e-5, sat=0.95, dead=0.7, loss_factor=1.05)


@pytest.mark.parametrize("switch", NOT_CAPTURED)
@pytest.mark.parametrize("family", FAMILIES)
def test_columns_not_captured_give_no_verdict(family: str, switch: str) -> None:
    """NaN meaning "not captured" (capture.params / updates / activations: false) is no evidence."""
    for length in MATRIX_LENGTHS:
        tables = synth(family, length, ALL_SICK)
        full = kinds(judge(tables))
        if not (switch == "activations" and family in RECURRENT):
            assert full & READS[switch], (length, full)  # the columns did carry the verdicts
        found = kinds(judge(not_captured(tables, switch)))
        assert not found & READS[switch] and "exploding" not in found, (length, found)
        assert "rising_loss" in found  # the history is still judged


@pytest.mark.parametrize("family", ["plain_mlp", "transformer/rezero"])
def test_capture_switches_leave_those_columns_nan(family: str) -> None:
    """What not_captured() writes is what the probe stores with each switch off."""
    import zoo
    from ablations.probe import measure_tables
    from verdict_tables import LOSS

    shape, opts = FAMILIES[family]
    net = zoo.build(family.split("/")[0], input_shape=shape, num_outputs=10, **opts)
    batch = np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32), np.arange(8) % 10
    for switch, (table, cols) in NOT_CAPTURED.items():
        t = measure_tables(net, batch, LOSS, training=True, capture={switch: False})
        assert t[table][cols].isna().all().all(), switch
        assert np.isfinite(t["history"]["loss"]).all() and np.isfinite(t["history"]["global_grad_norm"]).all()


def test_recurrent_families_have_no_activation_statistics() -> None:
    for family in FAMILIES:
        blocks = template(family).blocks
        assert blocks[["act_saturation", "act_dead"]].isna().all().all() == (family in RECURRENT), family


def test_tables_without_history_and_without_params_are_not_exploding() -> None:
    """Hand-made tables with no history fall back on the per-block norms; all-NaN there is "not captured"."""
    t = not_captured(synth("plain_mlp", "short", HEALTHY), "params")
    assert verdicts(t["params"], t["blocks"], pd.DataFrame()) == []
    t = synth("plain_mlp", "short", HEALTHY)
    t["params"].loc[t["params"]["step"] == 7, "grad_norm"] = np.nan  # partly NaN: non-finite, as before
    assert kinds(verdicts(t["params"], t["blocks"], pd.DataFrame())) == {"exploding"}


# ------------------------------------------------------------------------- at init (search pruning)


@pytest.mark.parametrize("family", FAMILIES)
def test_at_init(family: str) -> None:
    """The first captured steps only: a vanishing there is found (ReZero from step 1, when alpha has moved)
    although the rest of the run is healthy; a healthy start gives nothing; NaN counts from the first steps."""
    early = synth(family, "init", HEALTHY, before=Values(ratio=1e-8))  # vanishing in steps 0-9 only
    found = judge(early, at_init=True)
    assert kinds(found) == {"vanishing"} and 0 in found[0]["blocks"], found
    assert "over the first" in found[0]["message"]
    assert "vanishing" not in kinds(judge(early))  # judged over the run it is healthy
    assert judge(synth(family, "init", HEALTHY), at_init=True) == []
    nan2 = judge(synth(family, "init", HEALTHY, diverge="loss", diverge_at=2), at_init=True)
    assert kinds(nan2) == {"exploding"} and "from step 2" in nan2[0]["message"], nan2
    late = synth(family, "init", HEALTHY, diverge="loss", diverge_at=30)
    assert "exploding" not in kinds(judge(late, at_init=True)) and "exploding" in kinds(judge(late))


# ------------------------------------------------------------------------------- the rules' edge cases


@pytest.mark.parametrize("seed", range(8))
def test_a_flat_noisy_loss_is_a_plateau_whatever_the_sign_of_its_noise(seed: int) -> None:
    for length in MATRIX_LENGTHS:
        assert kinds(judge(synth("plain_mlp", length, SICK["plateau"], seed=seed))) == {"plateau"}


def test_all_zero_gradients_are_vanishing() -> None:
    """Every block at exactly 0 (saturated sigmoids underflow): the absolute floor, with no ratio to give."""
    t = synth("plain_mlp", "short", HEALTHY)
    t["params"].loc[t["params"]["role"] == "block", ["grad_norm", "update_norm", "update_ratio"]] = 0.0
    found = {v["kind"]: v for v in judge(t)}
    assert found["vanishing"]["blocks"] == [0, 1, 2], found
    assert "< 1e-08" in found["vanishing"]["message"] and "ratio" not in found["vanishing"]["message"]


def test_floor_and_ratio_are_named_apart() -> None:
    """A block below the floor whose ratio is fine is not said to receive < 1e-3 of the last block's."""
    t = synth("plain_mlp", "short", HEALTHY)
    p = t["params"]
    p.loc[p["role"] == "block", "grad_norm"] *= 1e-9  # every block tiny, the ratios ~1
    v = judge(t)[0]
    assert v["kind"] == "vanishing" and v["blocks"] == [0, 1, 2]
    assert "receive <" not in v["message"] and "< 1e-08" in v["message"], v


def test_lengths_cover_both_sides_of_the_window() -> None:
    (short, _, _), (long, _, _) = LENGTHS["short"], LENGTHS["long"]
    assert short < WINDOW < long - WINDOW


# ------------------------------------------------------------------------------------------- edge of stability


def _curvature_table(ratios, bound=20.0, preconditioned=False, every=16):
    """A ``curvature`` table whose sharpness is ``ratios`` x the bound at steps 0, every, 2 every, ..."""
    ratios = np.asarray(ratios, float)
    sharp = ratios * bound
    return pd.DataFrame({"step": np.arange(len(ratios)) * every, "epoch": 0, "sharpness": sharp / (9 if preconditioned else 1),
                         "preconditioned_sharpness": sharp if preconditioned else np.nan,
                         "stability_bound": bound if np.isfinite(bound) else np.nan, "edge_ratio": sharp / bound})


def _eos(curv, **th):
    t = synth("plain_mlp", "long", HEALTHY)
    return [v for v in verdicts(t["params"], t["blocks"], t["history"], {"window": WINDOW, **th}, curvature=curv)
            if v["kind"] == "edge_of_stability"]


def test_edge_of_stability_positive_and_negative():
    """Progressive sharpening up to the bound, then hovering at it: the verdict, naming sharpness and bound; the
    same run stopped below 0.9 of the bound, or at the bound only before the judged window, gives none."""
    rising = np.r_[np.linspace(0.1, 0.9, 30), 0.97, 1.02, 0.95, 1.01, 0.98, 1.03, 0.96, 1.0] * np.ones(1)
    (v,) = _eos(_curvature_table(rising))
    assert "sharpness (top Hessian eigenvalue)" in v["message"] and "stability bound 20" in v["message"]
    assert v["fixes"] and v["fixes"][0]["kind"] == "learning_rate"
    assert _eos(_curvature_table(np.linspace(0.1, 0.85, 40))) == []  # just inside: 0.85 < 0.9
    assert _eos(_curvature_table(np.r_[np.ones(20), np.full(20, 0.5)])) == []  # left the edge before the window
    assert len(_eos(_curvature_table(np.linspace(0.1, 0.85, 40)), edge_ratio=0.7)) == 1  # threshold overridable


def test_edge_of_stability_is_off_without_a_bound_and_uses_adams_preconditioned_sharpness():
    """No bound (RMSprop here, Adagrad, Adam with preconditioned: false): NaN edge ratio, no verdict however sharp;
    Adam: judged on the preconditioned sharpness against 38/lr."""
    assert _eos(_curvature_table(np.ones(20), bound=np.nan)) == []
    (v,) = _eos(_curvature_table(np.ones(20), bound=3800.0, preconditioned=True))
    assert "preconditioned sharpness" in v["message"]
    assert _eos(None) == [] and _eos(pd.DataFrame(columns=["step", "edge_ratio"])) == []
