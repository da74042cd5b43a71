"""Every use of a private Keras, keras-tuner or TensorFlow API, in one place, each with the reason.

gradzoo follows Keras' own ``TensorFlowTrainer.train_step`` line by line and drives keras-tuner's oracles over
gRPC; some of what that needs has no public twin. Fencing those uses here keeps the rest of the code on public
APIs and makes a version bump a one-file check. Each entry says why it is needed and the versions it was
checked on; ``pyproject.toml`` pins the ranges to those versions (``tests/test_compat.py`` exercises every
entry, so an upgrade that breaks one fails loudly).

Checked on: TensorFlow 2.21.0, Keras 3.15.1, keras-tuner 1.4.8 (Python 3.11).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

CHECKED = {"tensorflow": "2.21", "keras": "3.15", "keras_tuner": "1.4.8"}


# --------------------------------------------------------------------------------------------- Keras


def compute_loss(model: Any, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Any:
    """The compiled loss of ``model`` (``Trainer._compute_loss``), as Keras' own ``train_step`` computes it.

    Why: the public ``compute_loss`` is the override hook and skips the compile-time loss wrapper's
    bookkeeping on some paths; ``train_step`` itself calls the private one (keras/src/backend/tensorflow/
    trainer.py). Checked on Keras 3.15.
    """
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)  # noqa: SLF001


def track_loss(model: Any, loss: Any, batch_size: Any) -> None:
    """Updates the model's running ``loss`` metric (``Trainer._loss_tracker``) as ``train_step`` does.

    Why: the metric that ``fit`` reports as ``loss`` is this private tracker; there is no public setter.
    """
    model._loss_tracker.update_state(loss, sample_weight=batch_size)  # noqa: SLF001


def unscale_loss(loss: Any) -> Any:
    """The per-replica loss before Keras divided it by the number of replicas.

    Why: ``keras.src.losses.loss.unscale_loss_for_distribution`` has no public twin; ``train_step`` uses it to
    feed the loss tracker. Identity with one replica.
    """
    from keras.src.losses import loss as loss_module

    return loss_module.unscale_loss_for_distribution(loss)


def reduce_step_logs(logs: Any, strategy: Any) -> Any:
    """A step's logs from ``strategy.run`` reduced over replicas as ``fit`` reduces them
    (``reduce_per_replica(..., reduction="auto")``).

    Why: :mod:`ablations.probe.execution` compiles its own multi-step execution (a captured step, then plain
    ones, in one call) and must hand ``fit`` the logs Keras' own train function would; the reduction lives in
    keras/src/backend/tensorflow/trainer.py with no public twin. Checked on Keras 3.15.
    """
    from keras.src.backend.tensorflow.trainer import reduce_per_replica

    return reduce_per_replica(logs, strategy, reduction="auto")


class StrategyIndependentBuild:
    """Mixin for a ``keras.Model`` subclass: builds from the dataset's element spec, not from a batch, and
    before the first step is traced under every strategy.

    Why: under a tf.distribute strategy Keras (``Trainer._maybe_symbolic_build``, private) pulls one batch from
    a fresh iterator to build the model, which advances a reshuffling dataset's seed, so an arm would see
    other batches than under the default strategy. Without a strategy it defers building to the first trace
    of the train function, where the optimizer's slots and the metrics' variables are created; a
    ``tf.function`` that creates variables is traced twice (with and without creating them), which for a
    probed step is about a second per fit. Overriding the private hook is the only way to build from the
    element spec, ahead of the trace. Checked on Keras 3.15.
    """

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        import tensorflow as tf

        adapter = getattr(iterator, "data_adapter", None)
        if data_batch is None and adapter is not None:
            spec = adapter.get_tf_dataset().element_spec
            data_batch = tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), spec)
            iterator = None
        if self._distribute_strategy is None and data_batch is not None:  # type: ignore[attr-defined]
            try:
                with self.distribute_strategy.scope():  # type: ignore[attr-defined]
                    self._symbolic_build(data_batch=data_batch)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a model that only builds on real tensors: Keras' deferred build
                pass
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)  # type: ignore[misc]


def wrapped_rnn_base() -> type:
    """A ``keras.layers.RNN`` subclass whose cell wraps another cell, with the inner cell's dropout masks.

    Why: ``RNN._maybe_config_dropout_masks`` / ``_maybe_reset_dropout_masks`` (private) prepare the dropout masks
    of ``self.cell``; a wrapper cell (the through-time probe, the gate reader) must pass the *inner* cell and
    its part of the input. The wrapper cell exposes ``inner_cell_and_input(sequence)``. Checked on Keras 3.15.
    """
    import keras

    class WrappedRNN(keras.layers.RNN):
        def _maybe_config_dropout_masks(self, cell: Any, input_sequence: Any, input_state: Any) -> None:
            if hasattr(cell, "inner_cell_and_input"):
                cell, input_sequence = cell.inner_cell_and_input(input_sequence)
            super()._maybe_config_dropout_masks(cell, input_sequence, input_state)

        def _maybe_reset_dropout_masks(self, cell: Any) -> None:
            super()._maybe_reset_dropout_masks(getattr(cell, "cell", cell) if hasattr(cell, "inner_cell_and_input")
                                               else cell)

    return WrappedRNN


# ---------------------------------------------------------------------------------------- TensorFlow


def keep_functional_if(op: Any) -> None:
    """Marks an ``If``/``StatelessIf`` op so Grappler keeps it as one functional op (not Switch/Merge).

    Why: lowered, every tensor a branch reads gets a Switch node that runs on every step (6-17% of a step of
    the benchmark MLP for the underflow rescue's ~140 inputs, measured); the attribute
    ``_lower_using_switch_merge`` and ``Operation._set_attr`` are private. Checked on TF 2.21.
    """
    from tensorflow.core.framework import attr_value_pb2

    op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))  # noqa: SLF001


def op_determinism_enabled() -> bool:
    """Whether TF op determinism is on (``tensorflow.python.framework.config``, no public getter)."""
    from tensorflow.python.framework import config as tf_config

    return bool(tf_config.is_op_determinism_enabled())


def disable_op_determinism() -> None:
    """Turns TF op determinism off again.

    Why: ``tf.config.experimental.enable_op_determinism`` has no public inverse; arms set determinism per arm
    and an earlier arm's setting must not leak into the next.
    """
    from tensorflow.python.framework import config as tf_config

    tf_config.disable_op_determinism()


# --------------------------------------------------------------------------------------- keras-tuner


def set_oracle_dir(oracle: Any, directory: str, project: str) -> None:
    """Points an oracle at its state folder without a tuner (``Oracle._set_project_dir``).

    Why: gradzoo reloads and serves oracles itself (chief/worker, resume) without a keras-tuner Tuner, which
    is what normally calls this. Checked on keras-tuner 1.4.8.
    """
    oracle._set_project_dir(directory, project)  # noqa: SLF001


def oracle_retry_queue(oracle: Any) -> list[Any]:
    """Trials a reloaded oracle will hand out again (``Oracle._retry_queue``): needed to know it is done."""
    return list(getattr(oracle, "_retry_queue", []))


def is_worker(tuner: Any) -> bool:
    """``BaseTuner._is_worker()``: whether the tuner talks to a chief's oracle over gRPC."""
    return bool(tuner._is_worker())  # noqa: SLF001


def run_and_update_trial(tuner: Any, trial: Any) -> None:
    """``BaseTuner._try_run_and_update_trial``: runs a trial and reports it, failures included.

    Why: keras-tuner's own ``search`` loop busy-waits on IDLE over gRPC; gradzoo's loop
    (:func:`ablations.distributed.search_loop`) waits instead and calls this step of it.
    """
    tuner._try_run_and_update_trial(trial)  # noqa: SLF001


def tuner_protos() -> Any:
    """keras-tuner's gRPC protos module (``keras_tuner.src.protos``; not exported publicly)."""
    from keras_tuner.src import protos

    return protos


def oracle_servicer(oracle: Any) -> Any:
    """keras-tuner's gRPC servicer for ``oracle`` (``keras_tuner.src.distribute.oracle_chief``).

    Why: its ``start_server`` polls only every 20 s; gradzoo starts the gRPC server itself.
    """
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    return OracleServicer(oracle)


def oracle_client(oracle: Any) -> Any:
    """keras-tuner's gRPC client oracle (``keras_tuner.src.distribute.oracle_client.OracleClient``)."""
    from keras_tuner.src.distribute.oracle_client import OracleClient

    return OracleClient(oracle)


def get_space_with_timeout(client: Any, timeout: float) -> Any:
    """``GetSpace`` through the client's stub with a deadline (``client.stub``, an attribute of the client).

    Why: ``OracleClient.get_space`` waits up to an hour for a chief that may be gone.
    """
    protos = tuner_protos()
    return client.stub.GetSpace(protos.get_service().GetSpaceRequest(), wait_for_ready=True, timeout=timeout)


# ------------------------------------------------------------------------------ Keras functional graphs


def functional_graph(model: Any) -> Any:
    """The ``Functional`` graph behind ``model`` (itself, or a built Sequential's), else None.

    Why: walking a model's nodes (block discovery, opening nested models) needs Keras' ``Functional`` class
    and a Sequential's internal ``_functional`` graph; neither is public. Checked on Keras 3.15.
    """
    import keras
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def graph_nodes(fn: Any) -> list[Any]:
    """``fn``'s nodes from its inputs to its outputs (``Functional._nodes_by_depth``, deepest first)."""
    return [node for depth in sorted(fn._nodes_by_depth, reverse=True) for node in fn._nodes_by_depth[depth]]  # noqa: SLF001


def inputs_struct(fn: Any) -> Any:
    """The structure ``fn`` was built with for its inputs (``Functional._inputs_struct``)."""
    return fn._inputs_struct  # noqa: SLF001


def outputs_struct(fn: Any) -> Any:
    """The structure of ``fn``'s outputs (``Functional._outputs_struct``)."""
    return fn._outputs_struct  # noqa: SLF001


def node_arguments(node: Any, tensors: dict[int, Any]) -> tuple[tuple, dict]:
    """A node's call arguments with its input tensors replaced (``node.arguments.fill_in``), to call its
    operation again on other tensors with the same keyword arguments (keras-hub's ``padding_mask``)."""
    return node.arguments.fill_in(tensors)


def takes_training(op: Any) -> bool:
    """Whether a layer's ``call`` takes ``training`` (``Layer._call_has_training_arg``)."""
    return bool(getattr(op, "_call_has_training_arg", False))


def own_trainable_variables(layer: Any) -> list[Any]:
    """The trainable variables a layer created itself, not its sublayers' (``Layer._trainable_variables``)."""
    return list(getattr(layer, "_trainable_variables", []))


def sublayers(layer: Any) -> list[Any]:
    """A layer's direct sublayers (``Layer._layers``), to name variables by their path below the layer."""
    return list(getattr(layer, "_layers", []))


def linear_layer_bases() -> tuple[type, ...]:
    """Keras' convolution base classes (``keras.src.layers.convolutional``): every Conv*D, transposed,
    depthwise and separable convolution is a "linear" layer for block discovery."""
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    return BaseConv, BaseConvTranspose, BaseDepthwiseConv, BaseSeparableConv


def add_op_class() -> type:
    """The operation class of ``a + b`` between KerasTensors (``keras.src.ops.numpy.Add``): a residual sum
    written with ``+`` instead of an ``Add`` layer."""
    from keras.src.ops.numpy import Add

    return Add


# --------------------------------------------------------------------------------------- optimizer state


def optimizer_slot(optimizer: Any, variable: Any, slot: str) -> Any:
    """A Keras 3 optimizer's per-variable state ``slot`` (Adam: ``"velocities"``, ``"momentums"``) for
    ``variable`` (``Optimizer._get_variable_index`` into the private ``_<slot>`` lists).

    Why: the preconditioned sharpness (Cohen et al. 2022) needs Adam's second moments, which Keras keeps in
    ``optimizer._velocities`` without a public accessor; ``optimizer.variables`` holds them unlabelled.
    Checked on Keras 3.15.
    """
    return getattr(optimizer, f"_{slot}")[optimizer._get_variable_index(variable)]  # noqa: SLF001


def sgd_momentum(optimizer: Any, variable: Any) -> Any:
    """Keras SGD's velocity of ``variable`` (``optimizer.momentums[Optimizer._get_variable_index(v)]``).

    Why: with momentum (not Nesterov) the update Keras applies is exactly this velocity after the step, so
    the update norm needs no pre-update copy of the weights; the index lookup is private. Checked on 3.15.
    """
    return optimizer.momentums[optimizer._get_variable_index(variable)]  # noqa: SLF001


def uses_weight_decay(optimizer: Any, variable: Any) -> bool:
    """Whether Keras' decoupled weight decay applies to ``variable`` (``Optimizer._use_weight_decay``: its
    ``exclude_from_weight_decay`` names and patterns).

    Why: the update read from an optimizer's slots must include the decay Keras applied to exactly the
    variables it decays; the check is private. Checked on Keras 3.15.
    """
    return bool(optimizer._use_weight_decay(variable))  # noqa: SLF001


# ----------------------------------------------------------------------------------- TensorFlow Datasets


@contextlib.contextmanager
def tfds_download_retries(retries: int) -> Iterator[None]:
    """TFDS' HTTP downloads retry ``retries`` times instead of its 10 while the context is open
    (``tensorflow_datasets.core.download.downloader.MAX_RETRIES``, read when each download starts).

    Why: with no network (this project's CI, an air-gapped cluster) the 10 retries with exponential back-off
    take ~205 s per dataset before the error surfaces; a few retries still ride out a flaky connection. No
    public option sets it (``DownloadConfig`` has none). Checked on tensorflow-datasets 4.9.
    """
    from tensorflow_datasets.core.download import downloader

    saved = downloader.MAX_RETRIES
    downloader.MAX_RETRIES = retries
    try:
        yield
    finally:
        downloader.MAX_RETRIES = saved
