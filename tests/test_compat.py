"""Every private Keras / TensorFlow / keras-tuner API gradzoo uses (ablations/compat.py) still works.

These are the places a version bump breaks first; each entry is exercised here on a tiny object, so an
upgrade outside the pinned ranges (pyproject.toml) fails loudly in one file instead of deep in a run.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from ablations import compat


def _model() -> keras.Model:
    x = keras.Input((3,), name="x")
    h = keras.layers.Dense(4, name="d1")(x)
    out = keras.layers.Dense(2, name="d2")(keras.layers.Activation("relu", name="a")(h) + h)
    m = keras.Model(x, out)
    m.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return m


def test_every_compat_function_is_tested_here() -> None:
    names = {n for n, f in vars(compat).items() if callable(f) and not n.startswith("_")
             and getattr(f, "__module__", "") == "ablations.compat"}
    source = inspect.getsource(inspect.getmodule(test_every_compat_function_is_tested_here))
    missing = sorted(n for n in names if f"compat.{n}" not in source.replace("test_every", ""))
    assert missing == [], f"add a test for {missing}"


def test_keras_trainer_internals() -> None:
    m = _model()
    x, y = np.ones((5, 3), "float32"), np.zeros((5, 2), "float32")
    m.fit(x, y, verbose=0, epochs=1)  # builds the compiled loss and metrics
    loss = compat.compute_loss(m, x, y, m(x), None)
    assert float(loss) >= 0
    assert float(compat.unscale_loss(loss)) == pytest.approx(float(loss))  # one replica: unchanged
    compat.track_loss(m, loss, 5)
    strategy = tf.distribute.get_strategy()
    logs = compat.reduce_step_logs(strategy.run(lambda: {"loss": tf.constant(2.0)}), strategy)
    assert float(logs["loss"]) == 2.0
    assert hasattr(keras.Model, "_maybe_symbolic_build")  # compat.StrategyIndependentBuild overrides it
    assert issubclass(compat.StrategyIndependentBuild, object)
    rnn = compat.wrapped_rnn_base()
    assert issubclass(rnn, keras.layers.RNN)
    assert hasattr(keras.layers.RNN, "_maybe_config_dropout_masks") and hasattr(keras.layers.RNN,
                                                                                 "_maybe_reset_dropout_masks")
    opt = m.optimizer
    v = m.trainable_variables[0]
    assert tuple(compat.optimizer_slot(opt, v, "velocities").shape) == tuple(v.shape)
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    sgd.build(m.trainable_variables)
    assert tuple(compat.sgd_momentum(sgd, v).shape) == tuple(v.shape)
    adamw = keras.optimizers.AdamW(0.01, weight_decay=0.1)
    adamw.exclude_from_weight_decay(var_names=["bias"])
    adamw.build(m.trainable_variables)
    decayed = {w.path: compat.uses_weight_decay(adamw, w) for w in m.trainable_variables}
    assert any("bias" in p for p in decayed) and any(decayed.values()), decayed
    assert not any(d for p, d in decayed.items() if "bias" in p), decayed



@pytest.mark.parametrize("data", ["dataset", "arrays"])
def test_a_probed_fit_builds_before_tracing_and_traces_its_step_once(monkeypatch, data: str) -> None:
    # StrategyIndependentBuild builds the optimizer's slots and the metrics' variables ahead of the trace:
    # created inside it, they make TensorFlow trace the step twice (Keras defers the build without a strategy).
    from ablations.probe import ProbedModel

    traces = []
    step = ProbedModel.train_step
    monkeypatch.setattr(ProbedModel, "train_step", lambda self, batch: traces.append(1) or step(self, batch))
    x, y = np.ones((8, 3), "float32"), np.zeros((8,), "int64")
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="block_000_linear"),
                            keras.layers.Dense(2, name="head_linear")])
    m = ProbedModel(net, capacity=4)
    m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    args = (tf.data.Dataset.from_tensor_slices((x, y)).batch(4),) if data == "dataset" else (x, y)
    m.fit(*args, epochs=2, verbose=0, **({} if data == "dataset" else {"batch_size": 4}))
    assert m.optimizer.built and len(traces) == 1, len(traces)

def test_functional_graph_internals() -> None:
    m = _model()
    fn = compat.functional_graph(m)
    assert fn is m and compat.functional_graph(object()) is None
    seq = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert compat.functional_graph(seq) is not None
    nodes = [n for n in compat.graph_nodes(fn) if n.operation is not None and not n.is_input]
    assert [n.operation.name for n in nodes][:1] == ["d1"]
    assert compat.inputs_struct(fn) is not None and compat.outputs_struct(fn) is not None
    node = nodes[0]
    args, kwargs = compat.node_arguments(node, {id(t): t for t in node.input_tensors})
    assert args and isinstance(kwargs, dict)
    assert compat.takes_training(keras.layers.Dropout(0.1)) and not compat.takes_training(keras.layers.Flatten())
    attn = keras.layers.MultiHeadAttention(2, 4)
    attn(tf.ones((1, 3, 4)), tf.ones((1, 3, 4)))
    assert compat.own_trainable_variables(m.get_layer("d1")) and len(compat.sublayers(attn)) >= 4
    assert all(isinstance(c, type) for c in compat.linear_layer_bases())
    assert issubclass(type(m.get_layer("a").output.__add__), object) and isinstance(compat.add_op_class(), type)


def test_tensorflow_internals() -> None:
    @tf.function
    def f(p):
        graph = tf.compat.v1.get_default_graph()
        out = tf.cond(p, lambda: tf.constant(1.0), lambda: tf.constant(2.0))
        for op in graph.get_operations():
            if op.type in ("If", "StatelessIf"):
                compat.keep_functional_if(op)
        return out

    assert float(f(tf.constant(True))) == 1.0
    ops = f.get_concrete_function(tf.TensorSpec([], tf.bool)).graph.get_operations()
    assert any(op.type in ("If", "StatelessIf") and not op.get_attr("_lower_using_switch_merge") for op in ops)
    was = compat.op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    assert compat.op_determinism_enabled()
    compat.disable_op_determinism()
    assert not compat.op_determinism_enabled()
    if was:
        tf.config.experimental.enable_op_determinism()


def test_keras_tuner_internals(tmp_path, monkeypatch) -> None:
    import keras_tuner as kt

    hp = kt.HyperParameters()
    hp.Choice("a", [1, 2])
    oracle = kt.oracles.GridSearchOracle(objective=kt.Objective("loss", "min"), hyperparameters=hp, max_trials=2)
    compat.set_oracle_dir(oracle, str(tmp_path), "oracle")
    assert compat.oracle_retry_queue(oracle) == []

    class T(kt.engine.base_tuner.BaseTuner):
        def run_trial(self, trial, *args, **kwargs):
            return {"loss": float(trial.hyperparameters.get("a"))}

    tuner = T(oracle=oracle, directory=str(tmp_path), project_name="p", overwrite=True)
    assert compat.is_worker(tuner) is False
    trial = tuner.oracle.create_trial(tuner.tuner_id)
    compat.run_and_update_trial(tuner, trial)
    assert trial.status == kt.engine.trial.TrialStatus.COMPLETED
    protos = compat.tuner_protos()
    assert hasattr(protos.get_service(), "GetSpaceRequest")
    assert compat.oracle_servicer(oracle) is not None
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")  # a channel is opened lazily: nothing listens
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "1")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "worker-test")
    client = compat.oracle_client(oracle)
    assert hasattr(client, "stub") and callable(compat.get_space_with_timeout)


def test_tfds_internals() -> None:
    from tensorflow_datasets.core.download import downloader

    assert downloader.MAX_RETRIES == 10  # TFDS' default, which the retries below replace while a download runs
    with compat.tfds_download_retries(3):
        assert downloader.MAX_RETRIES == 3
    assert downloader.MAX_RETRIES == 10
