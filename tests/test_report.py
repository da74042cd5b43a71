"""The report of a tiny real run: figures with their data, links, arm pages, escaping, comparison, TensorBoard.

The run (built once per session by :func:`tiny_report`, also used by ``test_browser.py``): plain MLPs of depth 2
and width 8 on 256 digits, 1 epoch, sigmoid and ReLU x 2 seeds, plus (through ``per_point``) linear arms that
diverge (learning rate 1e6) and tanh arms that fail (LSUV that cannot converge), all one experiment.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
import yaml

XSS = 'Tiny run <script>document.documentElement.dataset.pwned = "1"; alert(1)</script> & more'
RUN_FIGURES = {"decay_rate", "grad_vs_depth", "preact_grad_vs_depth", "sigmoid_theory", "grad_heatmaps",
               "update_ratio_vs_depth", "saturation_vs_depth", "dead_units_vs_depth", "loss_curves", "epoch_curves"}
ARM_FIGURES = {"gradients", "heatmaps", "updates_activations", "training"}
_CACHE: dict[str, Path] = {}


def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, report folder) of the tiny run, trained and rendered once per test session."""
    if "root" not in _CACHE:
        from ablations.config import parse_experiment
        from ablations.report import build_report
        from ablations.sweep import run_sweep

        out = tmp_path_factory.mktemp("report_runs")
        raw = {"name": "tiny", "description": XSS,
               "data": {"name": "digits", "max_train_examples": 256, "batch_size": 64},
               "model": {"arch": "plain_mlp", "depth": 2, "width": 8},
               "train": {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.1}},
               "runtime": {"tensorboard": True},
               "grid": {"model.activation": ["sigmoid", "relu", "linear", "tanh"]}, "seeds": [0, 1],
               "per_point": [  # arms that diverge and arms that fail, in the same experiment
                   {"point": {"model.activation": "linear"}, "set": {"train.optimizer.learning_rate": 1e6}},
                   {"point": {"model.activation": "tanh"},
                    "set": {"model.initializer": "lsuv", "model.initializer_options": {"tol": 1e-12, "max_iter": 1}}},
               ]}
        run_sweep(parse_experiment(raw), out)
        root = out / "tiny"
        rep = tmp_path_factory.mktemp("report") / "tiny"
        build_report(root, rep, workers=1)
        _CACHE.update(root=root, rep=rep)
    return _CACHE["root"], _CACHE["rep"]


@pytest.fixture(scope="module")
def tiny(tfds_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_report(tmp_path_factory)


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("arms/*/summary.json"))]


def _links(html: str) -> list[str]:
    return [u for u in re.findall(r'(?:src|href)="([^"]+)"', html) if not u.startswith(("#", "http", "mailto:"))]


def test_the_run_has_a_diverged_and_a_failed_arm(tiny) -> None:
    root, _ = tiny
    status = {s["arm_id"]: s["status"] for s in _summaries(root)}
    assert sorted(status.values()) == ["completed"] * 4 + ["diverged"] * 2 + ["failed"] * 2, status


def test_a_diverged_arm_keeps_its_steps_up_to_the_blow_up_and_a_failed_one_says_why(tiny) -> None:
    root, _ = tiny
    for s in _summaries(root):
        arm = root / "arms" / s["arm_id"]
        if s["status"] == "diverged":
            history = pd.read_parquet(arm / "history.parquet")
            assert s["diverged_at_step"] is not None
            assert list(history.step) == list(range(s["diverged_at_step"] + 1))  # nothing after the blow-up
        elif s["status"] == "failed":
            assert "LSUV did not converge" in s["error"] and (arm / "error.txt").exists()
            assert not (arm / "history.parquet").exists()
        else:
            assert s["diverged_at_step"] is None


def test_every_figure_has_png_and_csv(tiny) -> None:
    _, rep = tiny
    html = (rep / "index.html").read_text()
    pngs = re.findall(r'<img src="([^"]+\.png)"', html)
    assert RUN_FIGURES <= {p[:-4] for p in pngs}
    for png in pngs:
        assert (rep / png).stat().st_size > 5000
        csv = pd.read_csv(rep / png.replace(".png", ".csv"))
        assert len(csv) > 0 and f'href="{png[:-4]}.csv"' in html
    assert '<p class="warn">' not in html, re.findall(r'<p class="warn">(.*?)</p>', html)


def test_links_point_to_existing_files(tiny) -> None:
    _, rep = tiny
    pages = [rep / "index.html", *sorted(rep.glob("arms/*/index.html"))]
    assert len(pages) == 1 + 8
    for page in pages:
        for link in _links(page.read_text()):
            assert (page.parent / unquote(link)).exists(), f"{page}: broken link {link}"


def test_arm_pages_link_back_and_show_their_figures(tiny) -> None:
    root, rep = tiny
    index = (rep / "index.html").read_text()
    for s in _summaries(root):
        links = [u for u in _links(index) if u.startswith("arms/") and (rep / unquote(u)).exists()]
        page = next(rep / unquote(u) for u in links if (rep / unquote(u)).read_text().count(f"<h1>{s['arm_id']}</h1>"))
        html = page.read_text()
        assert 'href="../../index.html"' in html
        figs = {p[:-4] for p in re.findall(r'<img src="([^"]+\.png)"', html)}
        if s["status"] == "failed":
            assert figs == set() and "LSUV did not converge" in html and "Traceback" in html
        else:
            assert ARM_FIGURES <= figs, (s["arm_id"], figs)
        if s["status"] == "diverged":
            assert f"diverged at step {s['diverged_at_step']}" in html


def test_diverged_and_failed_arms_are_in_the_tables(tiny) -> None:
    root, rep = tiny
    html = (rep / "index.html").read_text()
    for s in _summaries(root):
        assert s["arm_id"] in html
    assert '<td class="l status diverged">diverged</td>' in html and '<td class="l status failed">failed</td>' in html
    assert "2 diverged" in html and "2 failed" in html
    for s in _summaries(root):  # the lead's verdicts, where the run wrote them
        for v in s.get("verdicts") or []:
            assert f">{v['kind']}</span>" in html


def test_description_is_escaped(tiny) -> None:
    _, rep = tiny
    html = (rep / "index.html").read_text()
    assert "&lt;script&gt;document.documentElement.dataset.pwned" in html
    assert "<script>document" not in html and "alert(1)</script>" not in html
    assert "&amp; more" in html


def test_decay_rate_and_its_ci_match_numpy(tiny) -> None:
    """The overview's decay rate: least-squares slope of log10(kernel grad norm) vs depth, mean +- t CI."""
    from scipy import stats

    root, rep = tiny
    rates = {}
    for s in _summaries(root):
        if s["status"] != "completed":
            continue
        p = pd.read_parquet(root / "arms" / s["arm_id"] / "params.parquet")
        k = p[(p.role == "block") & (p.param == "kernel") & (p.step == p.step.min())].sort_values("depth")
        x, y = k.depth.to_numpy(float), np.log10(k.grad_norm.to_numpy())
        rates[s["arm_id"]] = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    csv = pd.read_csv(rep / "decay_rate.csv")
    init = csv[csv.when == "init"].set_index("arm_id")["decay"]
    for arm, r in rates.items():
        assert init[arm] == pytest.approx(r, rel=1e-6)
    sig = [r for a, r in rates.items() if "activation=sigmoid" in a]
    half = stats.t.ppf(0.975, 1) * np.std(sig, ddof=1) / math.sqrt(2)
    html = (rep / "index.html").read_text()
    assert f"{np.mean(sig):.2f} ± {half:.2g}" in html
    # Every sigmoid seed attenuates toward the input at init (a factor 0.25 per layer in theory, less at width 8
    # on one batch of 64: measured 10^0.11 and 10^0.17 per block).
    assert min(sig) > 0.05


def test_figure_csv_holds_the_stored_numbers(tiny) -> None:
    root, rep = tiny
    csv = pd.read_csv(rep / "grad_vs_depth.csv")
    arm = "activation=relu,seed=1"
    p = pd.read_parquet(root / "arms" / arm / "params.parquet")
    k = p[(p.role == "block") & (p.param == "kernel")]
    for when, step in (("init", k.step.min()), ("end", k.step.max())):
        got = csv[(csv.arm_id == arm) & (csv.when == when)].sort_values("depth")
        want = k[k.step == step].sort_values("depth")
        np.testing.assert_allclose(got.grad_norm.to_numpy(), want.grad_norm.to_numpy(), rtol=1e-6)
        assert set(got.step) == {step}


def test_sigmoid_theory_line_is_a_quarter_per_block(tiny) -> None:
    _, rep = tiny
    csv = pd.read_csv(rep / "sigmoid_theory.csv")
    theory = csv[csv.arm_id.str.startswith("theory")]
    assert theory.quantity.nunique() == 2  # one line per panel: weight and pre-activation gradient
    for _, line in theory.groupby("quantity"):
        depth = int(line.network_depth.iloc[0])
        assert depth == 2
        np.testing.assert_allclose(line.sort_values("depth").relative, 0.25 ** (depth - 1 - np.arange(depth)))
    measured = csv[~csv.arm_id.str.startswith("theory")]
    assert (measured[measured.depth == measured.depth.max()].relative == 1).all()


def test_tensorboard_events_hold_the_parquet_values(tiny) -> None:
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, rep = tiny
    assert f"tensorboard --logdir {root}" in (rep / "index.html").read_text()
    arm = root / "arms" / "activation=sigmoid,seed=0"
    ea = EventAccumulator(str(arm / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["tensors"])
    assert {"train/loss", "epoch/val_accuracy", "grad_norm/block_000_linear/kernel", "preact_grad_norm/block_001",
            "block_kernels/log10_grad_norm"} <= tags
    assert any(t.startswith("weights/") for t in tags)

    def series(tag: str) -> dict[int, float]:
        return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)}

    h = pd.read_parquet(arm / "history.parquet")
    loss = series("train/loss")
    assert sorted(loss) == list(h.step)
    np.testing.assert_allclose([loss[s] for s in h.step], h.loss, rtol=1e-6)
    p = pd.read_parquet(arm / "params.parquet")
    k = p[(p.layer == "block_000_linear") & (p.param == "kernel")]
    g = series("grad_norm/block_000_linear/kernel")
    np.testing.assert_allclose([g[s] for s in k.step], k.grad_norm, rtol=1e-6)
    e = pd.read_parquet(arm / "epochs.parquet")
    assert series("epoch/val_accuracy")[0] == pytest.approx(e.val_accuracy.iloc[0], rel=1e-6)


def test_tensorboard_gradient_histograms_are_the_stored_bins(tmp_path: Path) -> None:
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ablations.tensorboard import write_events

    edges = np.array([-3.0, -2.5, -2.0])
    rows = [{"step": s, "epoch": 0, "depth": 0, "block": "block_000", "bin": b, "log10_lo": lo, "log10_hi": hi,
             "count": c, "fraction": np.nan} for s, counts in ((0, (5, 7, 2)), (4, (1, 9, 3)))
            for b, (lo, hi, c) in enumerate(zip([*edges[:-1], np.nan], [*edges[1:], np.nan], counts))]
    for r in rows:
        if np.isnan(r["log10_lo"]):
            r["bin"] = -1  # exact zeros: not a log bin, left out of TensorBoard
    write_events(tmp_path, {"grad_hist": pd.DataFrame(rows)})
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    ea.Reload()
    got = {e.step: tf.make_ndarray(e.tensor_proto) for e in ea.Tensors("grad_hist/block_000")}
    np.testing.assert_array_equal(got[0], [[-3.0, -2.5, 5], [-2.5, -2.0, 7]])
    np.testing.assert_array_equal(got[4], [[-3.0, -2.5, 1], [-2.5, -2.0, 9]])


@pytest.mark.slow  # 25 s (two runs); the comparison's layout and colours: the plan test above
def test_comparison_of_two_runs_side_by_side(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs in one report (also drawn by 2 worker processes), and a recurrent-style time-lag figure."""
    from ablations.cli import main

    root, _ = tiny
    other = tmp_path / "tiny_b"
    # Run B: the seed-0 arms only (one of each status), so 8 + 4 arm pages are drawn, not 16.
    shutil.copytree(root, other, ignore=shutil.ignore_patterns("tb", "*.keras", "*seed=1"))
    exp = yaml.safe_load((other / "experiment.yaml").read_text())
    (other / "experiment.yaml").write_text(yaml.safe_dump({**exp, "name": "tiny_b"}))
    for arm in (other / "arms").iterdir():  # synthetic dL/dh_t halving per time step, 3 steps, 5 time steps
        summary = json.loads((arm / "summary.json").read_text())
        (arm / "summary.json").write_text(json.dumps({**summary, "baseline_loss": 2.3}))  # drawn when present
        if (arm / "history.parquet").exists():
            t = np.arange(5)
            pd.DataFrame([{"step": s, "layer": "rnn", "t": i, "act_grad_norm": 0.5 ** (4 - i)}
                          for s in range(3) for i in t]).to_parquet(arm / "time_grads.parquet")
    rep = tmp_path / "compare"
    monkeypatch.setenv("GRADZOO_REPORT_WORKERS", "2")
    assert main(["report", str(root), str(other), "--out", str(rep)]) == 0
    html = (rep / "index.html").read_text()
    assert "tiny vs tiny_b" in html and '<p class="warn">' not in html
    assert len(list(rep.glob("arms/*/index.html"))) == 8 + 4
    csv = pd.read_csv(rep / "grad_vs_depth.csv")
    assert set(csv.run) == {"tiny", "tiny_b"}
    a = csv[(csv.run == "tiny") & (csv.seed == 0)].drop(columns=["arm_id", "run"]).reset_index(drop=True)
    b = csv[csv.run == "tiny_b"].drop(columns=["arm_id", "run"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # same data, both columns of panels
    lag = pd.read_csv(rep / "grad_vs_time_lag.csv")
    assert set(lag.run) == {"tiny_b"}
    np.testing.assert_allclose(lag.act_grad_norm, 0.5 ** lag.lag)
    assert any((p.parent / "time_lag.png").exists() for p in rep.glob("arms/tiny_b*/index.html"))


def test_plan_moves_an_axis_to_columns_when_colours_run_out() -> None:
    from ablations.report.data import RunData
    from ablations.report.plotting import MAX_HUES, plan_for

    grid = {"model.depth": [2, 4], "model.activation": ["a", "b", "c", "d"], "model.width": [8, 16]}
    summaries = [{"arm_id": f"{d}{a}{w}", "values": {"model.depth": d, "model.activation": a, "model.width": w}}
                 for d in grid["model.depth"] for a in grid["model.activation"] for w in grid["model.width"]]
    empty = pd.DataFrame()
    run = RunData(root=Path("."), experiment={"grid": grid}, experiment_yaml="", summaries=summaries,
                  tables={}, axes=list(grid))
    plan = plan_for(run)
    assert plan.row == "model.depth" and plan.row_order == [2, 4]
    assert plan.col == "model.width" and plan.col_order == ["width=8", "width=16"]
    assert plan.hue_order == ["activation=a", "activation=b", "activation=c", "activation=d"]
    assert len(plan.hue_order) <= MAX_HUES
    run.axes = ["model.depth", "model.activation"]
    assert plan_for(run).col is None


def test_comparison_fills_an_axis_the_other_run_pinned() -> None:
    """Run A varies depth and a bundled model axis; run B pinned both: B's arms get their own settings."""
    from ablations.report.data import RunData, merge_runs
    from ablations.report.plotting import plan_for

    def run(name: str, values: list[dict], configs: dict[str, dict], axes: list[str]) -> RunData:
        summaries = [{"arm_id": f"a{i}", "seed": 0, "values": v} for i, v in enumerate(values)]
        blocks = pd.DataFrame([{"arm_id": f"a{i}", "seed": 0, "step": 0, "depth": 0, **{k: (json.dumps(x) if
                               isinstance(x, dict) else x) for k, x in v.items()}} for i, v in enumerate(values)])
        return RunData(root=Path(name), experiment={"name": name}, experiment_yaml="", summaries=summaries,
                       tables={"blocks": blocks}, axes=axes, arm_configs={f"a{i}": c for i, c in enumerate(configs)})

    a = run("A", [{"model": {"arch": "plain_mlp"}, "model.depth": 4},
                  {"model": {"arch": "resnet_mlp", "branch_scale": 0.5}, "model.depth": 8}],
            [{"model": {"arch": "plain_mlp", "depth": 4}}, {"model": {"arch": "resnet_mlp", "depth": 8,
                                                                      "branch_scale": 0.5}}], ["model", "model.depth"])
    b = run("B", [{}], [{"model": {"arch": "resnet_mlp", "depth": 8, "branch_scale": 0.5, "width": 3}}], [])
    merged = merge_runs([a, b])
    assert merged.axes == ["run", "model", "model.depth"]
    assert merged.summaries[2]["values"] == {"run": "B", "model": {"arch": "resnet_mlp", "branch_scale": 0.5},
                                             "model.depth": 8}
    assert list(merged.blocks["model.depth"]) == [4, 8, 8]
    plan = plan_for(merged)
    assert plan.labels["B/a0"] == plan.labels["A/a1"] == "model=resnet_mlp+0.5"  # same colour in both runs
    assert plan.col == "run" and plan.row == "model.depth" and plan.rows["B/a0"] == 8


@pytest.mark.slow  # 32 s (four architectures trained); their block columns are checked against tapes in test_instruments
def test_architecture_extras_are_plotted_from_the_stored_blocks(tfds_dir: str, tmp_path: Path) -> None:
    """Residual branch ratio, highway gate, ReZero alpha and stochastic-depth survival get their figures."""
    from ablations.config import parse_experiment
    from ablations.report import build_report
    from ablations.sweep import run_sweep

    raw = {"name": "extras", "data": {"name": "digits", "max_train_examples": 256, "batch_size": 32},
           "model": {"depth": 3, "width": 8},
           "train": {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.05}},
           "capture": {"histograms": True},
           "grid": {"model": [{"arch": "resnet_mlp"}, {"arch": "highway_mlp"}, {"arch": "rezero_mlp"},
                              {"arch": "stochastic_depth_mlp", "survival_prob": 0.5}]}, "seeds": [0]}
    run_sweep(parse_experiment(raw), tmp_path)
    rep = tmp_path / "report"
    build_report(tmp_path / "extras", rep, workers=1)
    html = (rep / "index.html").read_text()
    for key in ("branch_ratio_vs_depth", "gate_vs_depth", "rezero_alpha_vs_depth", "survival_vs_depth"):
        assert f'<img src="{key}.png"' in html, key
    arm = next(p for p in (tmp_path / "extras" / "arms").iterdir() if "stochastic" in p.name)
    b = pd.read_parquet(arm / "blocks.parquet")
    csv = pd.read_csv(rep / "survival_vs_depth.csv")
    got = csv[(csv.when == "end")].sort_values("depth")
    want = b.groupby("depth")["active"].mean()  # the running mean at the last captured step
    np.testing.assert_allclose(got.survival.to_numpy(), want.to_numpy(), rtol=1e-6)
    assert 0 < want.iloc[-1] < 1 and want.iloc[0] > want.iloc[-1] - 0.5
    alpha = pd.read_csv(rep / "rezero_alpha_vs_depth.csv")
    assert (alpha[alpha.when == "init"].alpha == 0).all()  # ReZero starts every block as the identity
    # capture.histograms: every arm page shows the gradient distribution, its CSV holds the stored counts.
    pages = sorted(rep.glob("arms/*/index.html"))
    assert len(pages) == 4 and all('src="grad_hist.png"' in p.read_text() for p in pages)
    page = next(p for p in pages if "stochastic" in p.parent.name)
    got = pd.read_csv(page.parent / "grad_hist.csv")
    stored = pd.read_parquet(arm / "grad_hist.parquet")
    last = stored[(stored.step == stored.step.max()) & (stored.bin >= 0)]
    merged = got[got.step == last.step.iloc[0]].merge(last, on=["depth", "bin"], suffixes=("", "_stored"))
    assert len(merged) == len(last) and (merged["count"] == merged["count_stored"]).all()
    assert last.groupby("depth")["count"].sum().gt(0).all()


def _synthetic_run(blocks: pd.DataFrame):
    from ablations.report.data import RunData

    return RunData(root=Path("."), experiment={"name": "s"}, experiment_yaml="", axes=[],
                   summaries=[{"arm_id": "a", "seed": 0, "values": {}, "status": "completed"}],
                   tables={"blocks": blocks.assign(arm_id="a", seed=0)})


def test_a_figure_whose_needs_are_absent_is_skipped_before_it_is_called(tmp_path: Path, monkeypatch) -> None:
    """``needs`` gates the call: a missing column (or one without a single value) skips the figure; either
    alternative of ``a | b`` will do; a figure that raises is reported, not fatal."""
    from ablations.report import figures
    from ablations.report.plotting import Plot, plan_for, subplots

    figures.specs("run")  # discover the shipped figures first, then register into a copy of the registry
    monkeypatch.setattr(figures, "_SPECS", dict(figures._SPECS))
    calls: list[str] = []

    def register(key: str, needs: tuple[str, ...]) -> figures.Spec:
        @figures.figure(key=key, section="Test", order=999, needs=needs)
        def draw(run, plan) -> Plot:
            calls.append(key)
            if key == "broken":
                raise RuntimeError("boom")
            fig, ax = subplots(1, 1, figsize=(2, 2))
            ax.plot([0, 1], [0, 1])
            return Plot(fig, pd.DataFrame({"x": [0, 1]}), key, "caption")

        return figures.get("run", key)

    run = _synthetic_run(pd.DataFrame({"step": [0, 0], "depth": [0, 1], "act_mean": [0.1, 0.2],
                                       "gate_mean": [np.nan, np.nan]}))
    plan = plan_for(run)
    problems: list[str] = []
    for key, needs, drawn in (("no_column", ("blocks:branch_ratio",), False),
                              ("all_nan", ("blocks:gate_mean",), False),
                              ("no_table", ("time_grads:act_grad_norm",), False),
                              ("one_of_two", ("time_grads:act_grad_norm | blocks:act_mean",), True),
                              ("both_needed", ("blocks:act_mean", "blocks:branch_ratio"), False),
                              ("whole_table", ("blocks",), True)):
        fig = figures.draw(register(key, needs), (run, plan), run.table, tmp_path, problems)
        assert (fig is not None) == drawn, key
        assert (key in calls) == drawn, key
        assert (tmp_path / f"{key}.png").exists() == drawn and (tmp_path / f"{key}.csv").exists() == drawn
    assert problems == []
    assert figures.draw(register("broken", ("blocks:act_mean",)), (run, plan), run.table, tmp_path, problems) is None
    assert problems == ["figure broken failed: RuntimeError: boom"]
    assert [s.key for s in figures.specs("run")][-7:] == ["all_nan", "both_needed", "broken", "no_column",
                                                        "no_table", "one_of_two", "whole_table"]  # order, key
    with pytest.raises(ValueError, match="scope"):
        figures.figure(key="x", section="Test", scope="page", order=1)
    with pytest.raises(ValueError, match="tuple"):
        figures.figure(key="x", section="Test", order=1, needs="blocks:act_mean")


def test_every_figure_needs_stored_tables_and_columns() -> None:
    """Each ``needs`` entry names a table the report loads and, for an instrument's table, a column some
    instrument writes (or derives); each module of the package registers exactly one figure."""
    import pkgutil

    from ablations import instruments
    from ablations.report import figures
    from ablations.report.data import TABLES

    columns: dict[str, set[str]] = {}
    for cls in instruments.classes():
        columns.setdefault(cls.table, set()).update(c.name for c in cls.columns)
        for table, col in cls.derived:
            columns.setdefault(table, set()).add(col.name)
    specs = figures.specs("run") + figures.specs("arm")
    assert len(specs) >= 23
    for spec in specs:
        assert spec.needs, spec.key  # every shipped figure says what it reads
        for alternatives in spec.requirements():
            for table, column in alternatives:
                assert table in TABLES, (spec.key, table)
                if table in instruments.tables() and column is not None:
                    assert column in columns[table], (spec.key, table, column)
    modules = [m.name for m in pkgutil.iter_modules(figures.__path__) if not m.name.startswith("_")]
    per_module = {m: [s.key for s in specs if s.fn.__module__ == f"{figures.__name__}.{m}"] for m in modules}
    assert all(len(keys) == 1 for keys in per_module.values()), per_module
    for scope in figures.SCOPES:
        orders = [s.order for s in figures.specs(scope)]
        assert len(set(orders)) == len(orders), (scope, orders)  # the page order is not left to the key
# ------------------------------------------------------------------------------------------ damaged and stale folders


def test_damaged_arms_are_named_and_the_healthy_ones_reported(tiny, tmp_path: Path, capsys) -> None:
    from ablations.cli import main

    root, _ = tiny
    copy = tmp_path / "tiny"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("tb", "*.keras"))
    arms = sorted(d for d in (copy / "arms").iterdir() if json.loads((d / "summary.json").read_text())["status"]
                  == "completed")
    cut, bad_summary, no_blocks = arms[0], arms[1], arms[2]
    data = (cut / "params.parquet").read_bytes()
    (cut / "params.parquet").write_bytes(data[: len(data) // 2])
    (bad_summary / "summary.json").write_text("[1]")
    (no_blocks / "blocks.parquet").unlink()
    rep = tmp_path / "rep"
    assert main(["report", str(copy), "--out", str(rep)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the terminal says so too, not only the page
    assert f"damaged arm left out: {cut.name}: params.parquet is damaged" in out
    assert f"damaged arm left out: {bad_summary.name}: summary.json is not an arm summary" in out
    assert f"damaged arm left out: {no_blocks.name}: blocks.parquet is missing" in out
    html = (rep / "index.html").read_text()
    assert "3 damaged arm(s)" in html
    assert f"<code>{cut.name}</code>: params.parquet is damaged" in html
    assert f"<code>{bad_summary.name}</code>: summary.json is not an arm summary (it holds a list)" in html
    assert f"<code>{no_blocks.name}</code>: blocks.parquet is missing" in html
    assert len(list(rep.glob("arms/*/index.html"))) == 8 - 3  # every healthy arm has its page
    assert "2 diverged" in html and '<img src="grad_vs_depth.png"' in html
    csv = pd.read_csv(rep / "grad_vs_depth.csv")
    assert not {cut.name, bad_summary.name, no_blocks.name} & set(csv.arm_id)


def test_arms_of_an_earlier_grid_or_config_are_listed_apart(tiny, tmp_path: Path) -> None:
    from ablations.report.data import load_run

    root, _ = tiny
    copy = tmp_path / "tiny"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("tb", "*.keras"))
    arm = next(d for d in sorted((copy / "arms").iterdir()) if "relu" in d.name)
    shutil.copytree(arm, copy / "arms" / "activation=elu,seed=0")  # an arm of an earlier grid
    cfg = yaml.safe_load((arm / "arm.yaml").read_text())
    cfg["train"]["epochs"] = 3  # this arm was trained before the base value changed
    (arm / "arm.yaml").write_text(yaml.safe_dump(cfg))
    run = load_run(copy)
    assert len(run.summaries) == 7 and arm.name not in {s["arm_id"] for s in run.summaries}
    assert run.others == {"activation=elu,seed=0": "not an arm of the current experiment.yaml (an earlier grid?)",
                          arm.name: "trained with an earlier config (train.epochs)"}
    assert set(run.params.arm_id) == {s["arm_id"] for s in run.summaries if s["status"] != "failed"}


def test_an_arm_missing_a_table_its_peers_have_is_named(tiny, tmp_path: Path) -> None:
    from ablations.report.data import load_run

    root, _ = tiny
    copy = tmp_path / "tiny"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("tb", "*.keras"))
    done = [d for d in sorted((copy / "arms").iterdir()) if (d / "history.parquet").exists()]
    rows = pd.DataFrame([{"step": 0, "layer": "rnn", "t": i, "act_grad_norm": 1.0} for i in range(3)])
    for d in done[1:]:
        rows.to_parquet(d / "time_grads.parquet")
    (note,) = load_run(copy).notes
    assert note.startswith(f"{done[0].name}: no time_grads.parquet, which {len(done) - 1} arm(s)")
