"""Strategies and mixed precision: equivalence with the default strategy, clear errors, unscaled statistics.

Tests that need logical CPU devices or several TensorFlow processes run in subprocesses (logical devices and
collectives can only be configured before TensorFlow starts); each is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablations.config import ConfigError, RuntimeConfig, parse_experiment
from ablations.strategy import StrategyError, parse_tf_config

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = {"history": ["loss", "global_grad_norm"],
           "params": ["grad_norm", "weight_norm", "update_norm", "update_ratio"],
           "blocks": ["act_grad_norm", "act_mean", "act_std", "act_saturation", "act_dead"]}


def tiny(runtime: dict, **train) -> dict:
    """A small arm: tanh MLP on digits, 6 steps, capture every 2nd step (exercises the non-captured path)."""
    return {"name": "s", "model": {"arch": "plain_mlp", "depth": 3, "width": 16, "activation": "tanh"},
            "data": {"batch_size": 32},
            "train": {"epochs": 2, "steps_per_epoch": 3, "optimizer": {"name": "sgd", "learning_rate": 0.1,
                                                                       "momentum": 0.9}, **train},
            "capture": {"every": 2, "histograms": True}, "runtime": runtime}


def run_py(code: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


_TWO_ARMS = """
    import json, sys
    from pathlib import Path
    from ablations.config import parse_experiment
    from ablations.strategy import configure_devices, make_strategy
    cfgs = {s: parse_experiment(c) for s, c in json.loads(sys.argv[1]).items()}
    configure_devices(cfgs["mirrored"].runtime)  # before any TensorFlow op
    from ablations.runner import run_arm
    assert make_strategy(cfgs["mirrored"].runtime).num_replicas_in_sync == 2
    for name, exp in cfgs.items():
        s = run_arm(exp.arms()[0], Path(sys.argv[2]) / name)
        assert s["status"] == "completed", s
"""


@pytest.mark.parametrize("deterministic", [True, False])
def test_mirrored_executions_of_a_captured_and_plain_steps_match_default(tfds_dir: str, tmp_path: Path,
                                                                         deterministic: bool) -> None:
    """2 replicas, steps_per_execution 2, every 2: each execution is one call of a captured step and a plain one
    (ablations.probe.execution) under the strategy; the same tables as one step per call without a strategy.
    Without op determinism the executions also read the clock in the graph (capture_cost timed in-graph)."""
    mirrored = {"strategy": "mirrored", "logical_cpus": 2, "devices": ["/cpu:0", "/cpu:1"],
                "deterministic": deterministic}
    cfgs = {"default": tiny({"strategy": "default", "logical_cpus": 2}, steps_per_epoch=4),
            "mirrored": tiny(mirrored, steps_per_epoch=4, steps_per_execution=2)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_TWO_ARMS), json.dumps(cfgs), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for table, cols in NUMERIC.items():
        a = pd.read_parquet(tmp_path / "default" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "mirrored" / f"{table}.parquet")
        assert list(a["step"]) == list(b["step"]) and set(a["step"]) == {0, 2, 4, 6}, table
        np.testing.assert_allclose(b[cols].to_numpy(float), a[cols].to_numpy(float), rtol=1e-5, atol=1e-7,
                                   err_msg=table)
    cost = json.loads((tmp_path / "mirrored" / "summary.json").read_text())["capture_cost"]
    assert cost.get("timed") == (None if deterministic else "in-graph"), cost
    if not deterministic:  # 4 executions, the first 2 left out: 2 captured and 2 plain steps timed
        assert (cost["in_graph"]["captured_steps"], cost["in_graph"]["plain_steps"]) == (2, 2)


def test_mirrored_on_two_logical_cpus_matches_default(tfds_dir: str, tmp_path: Path) -> None:
    """Same losses and statistics (rel. error < 1e-5) with 2 replicas as with the default strategy."""
    cfgs = {"default": tiny({"strategy": "default", "logical_cpus": 2}),
            "mirrored": tiny({"strategy": "mirrored", "logical_cpus": 2, "devices": ["/cpu:0", "/cpu:1"]})}
    for c in cfgs.values():  # the opt-in instruments too: per-example sums all-reduced, own cadences (an own
        # table, and columns of the shared params table: computed every step under replicas, recorded when due)
        c["capture"]["instruments"] = {"per_example": {"every": 4}, "init_distance": {"every": 4}}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_TWO_ARMS), json.dumps(cfgs), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for table, cols in {**NUMERIC, "params": [*NUMERIC["params"], "init_distance"]}.items():
        a = pd.read_parquet(tmp_path / "default" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "mirrored" / f"{table}.parquet")
        assert len(a) == len(b) > 0
        assert list(a["step"]) == list(b["step"]) and set(a["step"]) == {0, 2, 4}
        np.testing.assert_allclose(b[cols].to_numpy(float), a[cols].to_numpy(float), rtol=1e-5, atol=1e-7,
                                   err_msg=table)
    p = pd.read_parquet(tmp_path / "mirrored" / "params.parquet")
    assert p.loc[p.step == 4, "init_distance"].gt(0).any() and p.loc[p.step == 2, "init_distance"].isna().all()
    # Histograms of the all-reduced gradients: the same counts (an entry on a bin edge may move by one bin).
    ha = pd.read_parquet(tmp_path / "default" / "grad_hist.parquet")
    hb = pd.read_parquet(tmp_path / "mirrored" / "grad_hist.parquet")
    assert list(ha["step"]) == list(hb["step"]) and ha["count"].sum() == hb["count"].sum() > 0
    assert np.abs(ha["count"].to_numpy() - hb["count"].to_numpy()).sum() <= 2
    pa = pd.read_parquet(tmp_path / "default" / "per_example.parquet")
    pb = pd.read_parquet(tmp_path / "mirrored" / "per_example.parquet")
    assert list(pa["step"]) == list(pb["step"]) and set(pa["step"]) == {0, 4}
    stats = ["mean_norm", "std_norm", "trace_sigma", "grad_sq", "b_simple", "snr"]
    np.testing.assert_allclose(pb[stats].to_numpy(float), pa[stats].to_numpy(float), rtol=1e-4, err_msg="per_example")
    a = pd.read_parquet(tmp_path / "default" / "params.parquet")
    b = pd.read_parquet(tmp_path / "mirrored" / "params.parquet")
    np.testing.assert_allclose(b["init_distance"].to_numpy(float), a["init_distance"].to_numpy(float), rtol=1e-5,
                               atol=1e-7, err_msg="init_distance")


def test_tf_config_errors_say_what_was_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(StrategyError, match="needs \\$TF_CONFIG, found it unset"):
        parse_tf_config()
    with pytest.raises(StrategyError, match="not valid JSON.*found: '\\{cluster: oops'"):
        parse_tf_config("{cluster: oops")
    with pytest.raises(StrategyError, match="no 'worker' or 'chief' list; found roles \\['ps'\\]"):
        parse_tf_config(json.dumps({"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}))
    with pytest.raises(StrategyError, match="'host:port' strings; found \\['localhost'\\]"):
        parse_tf_config(json.dumps({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(StrategyError, match="no task .*found task=None"):
        parse_tf_config(json.dumps({"cluster": {"worker": ["h:1"]}}))
    with pytest.raises(StrategyError, match="index 2 is out of range: cluster\\['worker'\\] has 2 address"):
        parse_tf_config(json.dumps({"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 2}}))
    ok = parse_tf_config(json.dumps({"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 1}}))
    assert ok["task"]["index"] == 1


def test_multi_worker_with_bad_tf_config_fails_the_arm_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from ablations.strategy import make_strategy

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}')
    with pytest.raises(StrategyError, match="index 0 is out of range: cluster\\['worker'\\] has 0"):
        make_strategy(RuntimeConfig(strategy="multi_worker"))


def test_unavailable_tpu_and_devices_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    from ablations.strategy import make_strategy

    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(StrategyError) as err:
        make_strategy(RuntimeConfig(strategy="tpu"))
    msg = str(err.value)
    assert "no TPU could be started" in msg and "runtime.tpu=None" in msg and "CPU:0" in msg
    assert "Cause:" in msg
    with pytest.raises(StrategyError, match="runtime.device '/gpu:7' is not available; found: .*CPU:0"):
        make_strategy(RuntimeConfig(strategy="one_device", device="/gpu:7"))
    if not tf.config.list_logical_devices("GPU"):  # auto: no TPU hint, no GPUs -> the default strategy
        assert make_strategy(RuntimeConfig(strategy="auto")) is tf.distribute.get_strategy()
    one = make_strategy(RuntimeConfig(strategy="one_device", device="cpu:0"))
    assert one.extended.worker_devices[0].endswith("CPU:0")


def test_logical_cpus_after_tensorflow_started_is_a_clear_error() -> None:
    import tensorflow as tf

    from ablations.strategy import configure_devices

    tf.constant(1.0) + 1.0  # TensorFlow is now initialised in this process
    have = len(tf.config.list_logical_devices("CPU"))
    configure_devices(RuntimeConfig(logical_cpus=have))  # what is already there is fine
    with pytest.raises(StrategyError, match=f"logical_cpus: {have + 3} was requested.*already initialised"):
        configure_devices(RuntimeConfig(logical_cpus=have + 3))


def test_runtime_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="runtime.strategy.*'auto', 'default', 'one_device', 'mirrored'"):
        parse_experiment({"name": "x", "runtime": {"strategy": "gpu"}})
    with pytest.raises(ConfigError, match="runtime.precision.*'float32', 'mixed_float16' or 'mixed_bfloat16'"):
        parse_experiment({"name": "x", "runtime": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match="runtime.devices is for strategy mirrored"):
        parse_experiment({"name": "x", "runtime": {"devices": ["/gpu:0"]}})
    with pytest.raises(ConfigError, match="unknown key 'runtime.device_count'"):
        parse_experiment({"name": "x", "runtime": {"device_count": 2}})


def test_mixed_float16_statistics_are_unscaled(tfds_dir: str, tmp_path: Path) -> None:
    """Loss-scaled gradients are divided by the loss scale before statistics: norms match float32 (1e-2)."""
    import keras

    from ablations.runner import run_arm

    out = {}
    for precision in ("float32", "mixed_float16"):
        arm = parse_experiment(tiny({"precision": precision}, epochs=1)).arms()[0]
        summary = run_arm(arm, tmp_path / precision)
        assert summary["status"] == "completed", summary
        out[precision] = {t: pd.read_parquet(tmp_path / precision / f"{t}.parquet") for t in NUMERIC}
        assert keras.mixed_precision.global_policy().name == "float32"  # restored after the arm
    net = keras.saving.load_model(tmp_path / "mixed_float16" / "final.keras")
    assert net.get_layer("block_000_linear").dtype_policy.name == "mixed_float16"  # really ran in float16
    # Every statistic column at every captured step; without unscaling the gradient norms would be 2**15 times
    # larger (Keras' initial loss scale). float16 activations round to ~1e-3, so 3e-2 relative.
    for table, cols in NUMERIC.items():
        a, b = out["float32"][table], out["mixed_float16"][table]
        assert list(a["step"]) == list(b["step"]) and set(a["step"]) == {0, 2}
        np.testing.assert_allclose(b[cols].to_numpy(float), a[cols].to_numpy(float), rtol=3e-2, atol=1e-4,
                                   err_msg=table)


@pytest.mark.slow
def test_multi_worker_two_processes_on_loopback(tfds_dir: str, tmp_path: Path) -> None:
    """MultiWorkerMirroredStrategy, 2 local processes: the arm finishes and both hold identical weights."""
    import keras

    from ablations.sweep import free_port

    cfg = tmp_path / "mw.yaml"
    cfg.write_text(json.dumps(tiny({"strategy": "multi_worker"})))
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:
        ports[1] = free_port()
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for i in range(2):
            env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
            procs.append(subprocess.Popen([sys.executable, "-m", "ablations", "run", str(cfg), "--out",
                                           str(tmp_path / "runs"), "--no-report"], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    root = tmp_path / "runs" / "s"
    chief = root / "arms" / "seed=0"
    other = root / ".multi_worker" / "worker-1" / "arms" / "seed=0"
    assert json.loads((chief / "summary.json").read_text())["status"] == "completed"
    assert not (root / "arms" / ".multi_worker").exists()
    w0 = keras.saving.load_model(chief / "final.keras").get_weights()
    w1 = keras.saving.load_model(other / "final.keras").get_weights()
    for x, y in zip(w0, w1):
        np.testing.assert_array_equal(x, y)
    assert len(pd.read_parquet(chief / "params.parquet")) > 0


def test_op_determinism_is_set_per_arm_not_inherited() -> None:
    from tensorflow.python.framework import config as tf_config

    from ablations.strategy import set_op_determinism

    was = tf_config.is_op_determinism_enabled()
    try:
        set_op_determinism(True)
        assert tf_config.is_op_determinism_enabled()
        set_op_determinism(False)  # a later arm with runtime.deterministic: false (e.g. for jit_compile)
        assert not tf_config.is_op_determinism_enabled()
    finally:
        set_op_determinism(was)


@pytest.mark.slow  # 11 s (a subprocess importing TensorFlow); the other strategy errors stay in the default suite
def test_an_unreachable_tpu_address_fails_fast_with_exit_2(tmp_path: Path) -> None:
    """TensorFlow's connect_to_cluster waits forever on an address nobody serves (timeout 0): checked first."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\nmodel: {depth: 1, width: 8}\ntrain: {epochs: 1, steps_per_epoch: 1}\n"
                   "runtime: {strategy: tpu, tpu: 'grpc://127.0.0.1:1'}\n")
    # A user's own TF_CPP_MIN_LOG_LEVEL wins over our quiet default (and some test modules set one on import).
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-m", "ablations", "run", str(cfg), "--out", str(tmp_path / "runs"),
                           "--no-report"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "TPU worker 127.0.0.1:1 is not reachable" in out and "nothing was trained" in out
    assert "Traceback" not in out and "E0000" not in out  # no absl lines either
    assert not list((tmp_path / "runs").rglob("summary.json"))
