"""Keras views of the zoo's recurrent models: the through-time probe and the gate reader.

Pascanu, Mikolov & Bengio 2013 (gradients through time vanish or explode with the recurrent Jacobians);
Hochreiter & Schmidhuber 1997; Gers et al. 2000 (forget gate). Used by the ``time_grads`` and ``rnn_gates``
instruments; a private module (it defines Keras layers, so importing it imports Keras).

**Through-time gradients.** For every recurrent layer ``l`` (``block_<l>_rnn``) and every step ``t`` we want
the total derivative dL/dh_t: through the output at t *and* through every later state. The trick: a view of
the model in which each recurrent layer runs ``keras.layers.RNN(ProbeCell(cell))``; the probe cell calls the
*same* cell object (same variables) and adds an extra input ``eps_t`` to the new state, h_t' = h_t + eps_t,
which is both the step's output and the state carried to t + 1. Feeding eps = 0 leaves the forward pass
unchanged, and dL/d eps_t = dL/dh_t exactly (tests/test_rnn.py checks it against an explicitly unrolled
loop). The fused ``keras.layers.LSTM`` (cuDNN on GPU) cannot be probed; the view always runs the cell. The
probe trains its captured steps through the view (:func:`training_view`: every tensor of a chain model has its
value there, so the taps are read in it too), so dL/d eps_t comes from the training backward pass itself; a
captured step costs the view's pass instead of the model's pass plus the view's. One view per model
(:func:`shared_time_view`) serves the step, ``time_grads`` and ``per_example``.

**Gate statistics.** :func:`gate_statistics` runs the recurrent layers on a batch (inference mode) and returns,
per layer and gate (LSTM: input, forget, output; GRU: update, reset), the mean gate value and the fraction of
entries (examples x steps x units) below 0.05 and above 0.95 (saturated shut / open).

Only chain-shaped models (each layer feeding the next, as every zoo recurrent model is) and unidirectional
layers are supported; anything else fails with a clear error.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import keras
from ablations.lazy import pd
import tensorflow as tf

import zoo
from ablations import compat

SATURATED_LOW, SATURATED_HIGH = 0.05, 0.95
GATE_NAMES = {"LSTMCell": ("input", "forget", "output"), "GRUCell": ("update", "reset")}


def _is_recurrent_block(layer: keras.layers.Layer) -> bool:
    parsed = zoo.parse_layer_name(layer.name)
    return parsed is not None and parsed[1] == "rnn"


def chain_problem(model: keras.Model) -> str | None:
    """Why the through-time view and the gate statistics cannot be built for ``model`` (None: they can)."""
    try:
        _check_chain(model)
    except (ValueError, AttributeError) as err:  # AttributeError: no graph (subclassed)
        return str(err)
    return None


def _check_chain(model: keras.Model) -> list[keras.layers.Layer]:
    """Returns the model's layers after the input, checking that each one feeds the next."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("through-time probing needs a model with one input and one output")
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    prev = model.inputs[0]
    for layer in layers:
        if layer.input is not prev:  # node 0: the model's own call (views add later nodes to shared layers)
            raise ValueError(f"through-time probing supports chain models (each layer feeds the next, as the "
                             f"zoo's recurrent models do); layer '{layer.name}' breaks the chain")
        prev = layer.output
    rec = [l for l in layers if _is_recurrent_block(l)]
    if not rec:
        raise ValueError("the model has no recurrent layer named block_<i>_rnn")
    for layer in rec:
        if isinstance(layer, keras.layers.Bidirectional) or not isinstance(layer, keras.layers.RNN):
            raise ValueError(f"layer '{layer.name}' is {type(layer).__name__}: through-time probing supports "
                             "unidirectional keras.layers.RNN subclasses (SimpleRNN, LSTM, GRU); "
                             "set bidirectional: false")
    return layers


class _WrappedCell(keras.layers.Layer):
    """Base of the wrapper cells: calls an already built cell; the input is [x_t, extra_t] concatenated."""

    def __init__(self, cell: keras.layers.Layer, in_dim: int, **kwargs: Any):
        super().__init__(dtype=cell.dtype_policy, **kwargs)
        self.cell, self.in_dim = cell, int(in_dim)
        self.units = cell.units
        self.state_size = cell.state_size

    def build(self, input_shape: Any) -> None:
        if not self.cell.built:
            self.cell.build((input_shape[0], self.in_dim))
        self.built = True

    def inner_cell_and_input(self, sequence: Any) -> tuple[Any, Any]:
        """The wrapped cell and its part of the input sequence (for its dropout masks)."""
        return self.cell, sequence[..., : self.in_dim]

    def _step(self, inputs: Any, states: Any, training: bool) -> tuple[Any, Any, list[Any]]:
        x = inputs[..., : self.in_dim]
        h, new_states = self.cell(x, states, training=training)
        new_states = list(new_states) if isinstance(new_states, (list, tuple)) else [new_states]
        return x, h, new_states


class ProbeCell(_WrappedCell):
    """Runs ``cell`` and adds ``eps_t`` (the last ``units`` input features) to h_t, output and state alike."""

    @property
    def output_size(self) -> int:
        return self.units

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        _, h, new_states = self._step(inputs, states, training)
        h = h + inputs[..., self.in_dim:]
        return h, [h, *new_states[1:]]


class GateCell(_WrappedCell):
    """Runs ``cell`` and outputs [h_t, gate_1, ..., gate_G] concatenated (inference mode, no dropout)."""

    @property
    def output_size(self) -> int:
        return self.units * (1 + len(GATE_NAMES[type(self.cell).__name__]))

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        x, h, new_states = self._step(inputs, states, False)
        h_prev = states[0] if isinstance(states, (list, tuple)) else states
        return keras.ops.concatenate([h, *cell_gates(self.cell, x, h_prev)], axis=-1), new_states


def cell_gates(cell: keras.layers.Layer, x: Any, h_prev: Any) -> list[Any]:
    """The gate activations of one step of a Keras LSTMCell (i, f, o) or GRUCell (z, r), without dropout."""
    ops, n, act = keras.ops, cell.units, cell.recurrent_activation
    name = type(cell).__name__
    if name == "LSTMCell":
        z = ops.matmul(x, cell.kernel) + ops.matmul(h_prev, cell.recurrent_kernel)
        if cell.use_bias:
            z = z + cell.bias
        return [act(z[:, :n]), act(z[:, n:2 * n]), act(z[:, 3 * n:])]
    if name == "GRUCell":
        xz = ops.matmul(x, cell.kernel[:, : 2 * n])
        hz = ops.matmul(h_prev, cell.recurrent_kernel[:, : 2 * n])
        if cell.use_bias:
            if cell.reset_after:
                xz, hz = xz + cell.bias[0, : 2 * n], hz + cell.bias[1, : 2 * n]
            else:
                xz = xz + cell.bias[: 2 * n]
        s = xz + hz
        return [act(s[:, :n]), act(s[:, n:])]
    raise ValueError(f"gate statistics need an LSTM or GRU cell, got {name}")


# An RNN over a wrapper cell that prepares/clears the *inner* cell's dropout masks, as Keras does.
_WrappedRNN = compat.wrapped_rnn_base()


@dataclasses.dataclass
class TimeProbe:
    """A weight-sharing view of a recurrent model with one zero "eps" input per recurrent layer.

    Attributes:
        view: ``keras.Model([x, eps_0, ..., eps_{L-1}]) -> output``; eps_l has shape [B, T_l, units_l].
        names: the recurrent layers' names (``block_<i>_rnn``), in depth order.
        units: units of each recurrent layer.
        lengths: T of each recurrent layer's input sequence.
        tensors: ``id(tensor of the model's graph)`` -> the same value in the view (its input and every layer's
            output: a chain model has no other tensors), so a tap of the model can be read in the view.
    """

    view: keras.Model
    names: list[str]
    units: list[int]
    lengths: list[int]
    tensors: dict = dataclasses.field(default_factory=dict)

    def zeros(self, batch_size: Any, dtype: Any = None) -> list[tf.Tensor]:
        """The zero eps inputs for a batch."""
        dtype = dtype or self.view.inputs[1].dtype
        return [tf.zeros([batch_size, t, u], dtype) for t, u in zip(self.lengths, self.units)]


_VIEWS: "weakref.WeakKeyDictionary[keras.Model, TimeProbe]" = weakref.WeakKeyDictionary()


def shared_time_view(model: keras.Model) -> TimeProbe:
    """:func:`time_probe_view` of ``model``, built once per model: the instruments that read dL/dh_t
    (``time_grads``, ``per_example``) and the training step share one view, so its eps gradients from one
    backward pass serve them all."""
    if model not in _VIEWS:
        _VIEWS[model] = time_probe_view(model)
    return _VIEWS[model]


def time_probe_view(model: keras.Model) -> TimeProbe:
    """Builds the through-time probe view of a zoo recurrent model (shares its layers and variables)."""
    layers = _check_chain(model)
    x_in = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="input")
    x, eps_inputs, names, units, lengths = x_in, [], [], [], []
    tensors = {id(model.inputs[0]): x_in}
    for layer in layers:
        if not _is_recurrent_block(layer):
            x = layer(x)
            tensors[id(layer.output)] = x
            continue
        cell, length = layer.cell, int(x.shape[1])
        eps = keras.Input(shape=(length, cell.units), dtype=layer.compute_dtype, name=f"eps_{len(names)}")
        joined = keras.layers.Concatenate(axis=-1, name=f"{layer.name}_probe_join", dtype=layer.dtype_policy)(
            [x, eps])
        rnn = _WrappedRNN(ProbeCell(cell, int(x.shape[-1])), return_sequences=layer.return_sequences,
                          go_backwards=layer.go_backwards, name=f"{layer.name}_probe", dtype=layer.dtype_policy)
        x = rnn(joined)
        tensors[id(layer.output)] = x
        eps_inputs.append(eps)
        names.append(layer.name)
        units.append(int(cell.units))
        lengths.append(length)
    view = keras.Model([x_in, *eps_inputs], x, name=f"{model.name}_time_probe")
    return TimeProbe(view, names, units, lengths, tensors)


def training_view(model: keras.Model) -> Any:
    """The through-time view as the probe's training forward pass (a
    :class:`~ablations.instruments.base.ForwardView` under the key ``time``)."""
    from ablations.instruments.base import ForwardView

    probe = shared_time_view(model)
    return ForwardView("time", probe.view.inputs[0], list(probe.view.inputs[1:]), probe.tensors, probe.zeros)


def step_time_grads(probe: TimeProbe, ctx: Any) -> list[tf.Tensor]:
    """dL/dh_t ``[B, T, units]`` of every recurrent layer for the step in ``ctx``, for its loss.

    From the training backward pass when the probe trained this step through the view (``ctx.view_grads``:
    no extra pass); else (``measure``, a model the view cannot stand in for) one more forward and backward
    pass through the view, at the same weights.
    """
    got = ctx.view_grads.get("time")
    if got is not None:
        return list(got)
    eps = probe.zeros(tf.shape(tf.nest.flatten(ctx.x)[0])[0])
    with tf.GradientTape() as tape:
        tape.watch(eps)
        pred = probe.view([ctx.x, *eps], training=True)
        loss = compat.compute_loss(ctx.model, ctx.x, ctx.y, pred, ctx.sample_weight)
    return tape.gradient(loss, eps)


def time_grads(probe: TimeProbe, x: Any, y: Any, loss_fn: Callable[[Any, Any], Any],
               training: bool = False) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """Returns (batch-mean loss, [dL/dh for each layer: [B, T, units]]) for one batch."""
    x = tf.convert_to_tensor(x, dtype=probe.view.inputs[0].dtype)
    eps = probe.zeros(tf.shape(x)[0])
    with tf.GradientTape() as tape:
        tape.watch(eps)
        y_pred = probe.view([x, *eps], training=training)
        loss = tf.reduce_mean(loss_fn(y, y_pred))
    return loss, tape.gradient(loss, eps)


# ----------------------------------------------------------------------------------------- gate statistics


def gate_values(model: keras.Model, x: Any) -> dict[str, dict[str, tf.Tensor]]:
    """``{layer name: {gate name: [B, T, units] activations}}`` for every LSTM/GRU layer, inference mode."""
    layers = _check_chain(model)
    last_rec = max(i for i, l in enumerate(layers) if _is_recurrent_block(l))
    out: dict[str, dict[str, tf.Tensor]] = {}
    h = tf.convert_to_tensor(x)
    for layer in layers[: last_rec + 1]:
        if not _is_recurrent_block(layer):
            h = layer(h, training=False)
            continue
        cell = layer.cell
        names = GATE_NAMES.get(type(cell).__name__)
        if names is None:  # a SimpleRNN layer in the stack: no gates, pass its sequence on
            seq = _WrappedRNN(_PassCell(cell, int(h.shape[-1])), return_sequences=True, dtype=layer.dtype_policy)
            h = seq(h)
            continue
        rnn = _WrappedRNN(GateCell(cell, int(h.shape[-1])), return_sequences=True, dtype=layer.dtype_policy)
        full = rnn(h, training=False)
        n = cell.units
        out[layer.name] = {g: full[..., n * (k + 1): n * (k + 2)] for k, g in enumerate(names)}
        h = full[..., :n]
    return out


class _PassCell(_WrappedCell):
    """Runs the cell unchanged (a wrapper only so every layer of the stack returns its whole sequence)."""

    @property
    def output_size(self) -> int:
        return self.units

    def call(self, inputs: Any, states: Any, training: bool = False) -> tuple[Any, list[Any]]:
        _, h, new_states = self._step(inputs, states, False)
        return h, new_states


def gate_statistics(model: keras.Model, x: Any) -> pd.DataFrame:
    """Per recurrent layer and gate: ``layer, depth, gate, mean, frac_low, frac_high`` on the batch ``x``.

    ``frac_low``/``frac_high`` are the fractions of entries below 0.05 / above 0.95 (a gate saturated shut /
    open, where its sigmoid derivative is under 0.05). Empty for models without LSTM/GRU layers.
    """
    rows = []
    for name, gates in gate_values(model, x).items():
        for gate, v in gates.items():
            v = tf.cast(v, tf.float32)
            rows.append(dict(layer=name, depth=zoo.parse_layer_name(name)[0], gate=gate,
                             mean=float(tf.reduce_mean(v)),
                             frac_low=float(tf.reduce_mean(tf.cast(v < SATURATED_LOW, tf.float32))),
                             frac_high=float(tf.reduce_mean(tf.cast(v > SATURATED_HIGH, tf.float32)))))
    return pd.DataFrame(rows, columns=["layer", "depth", "gate", "mean", "frac_low", "frac_high"])
