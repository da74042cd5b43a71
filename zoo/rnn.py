"""Recurrent zoo models: stacked SimpleRNN, LSTM and GRU.

Elman 1990 (simple RNN); Hochreiter & Schmidhuber 1997 (LSTM); Cho et al. 2014 (GRU); Pascanu et al. 2013
(vanishing/exploding through time); Le et al. 2015 (IRNN). Recurrent layer ``i`` is named
``block_<i>_rnn`` (its cell holds ``kernel``, ``recurrent_kernel``, ``bias``), so the probe orders the
stacked layers by depth; :mod:`ablations.instruments.time_grads` finds them by that name for the through-time gradients.

Inputs: ``[T, features]`` float sequences, or ``[T]`` integer tokens (one-hot encoded by a ``stem_onehot``
layer, ``vocab_size`` defaulting to ``num_outputs`` as in the copy task). Images must first become sequences
(``data.transform.sequence``). ``output: last`` classifies/regresses from the last step's state;
``output: sequence`` gives a prediction per time step (copy task).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from zoo import register
from zoo.blocks import block_name
from zoo.common import check_choice, check_depth
from zoo.initializers import make_initializer
from zoo.rnn_init import GateBias, RecurrentInitializer
from zoo.schema import CELL_ACTIVATIONS, RECURRENT_BASES
from zoo.schema import RNN_OUTPUTS as OUTPUTS

# Square recurrent blocks per cell kind, in the Keras gate order (LSTM: i f c o; GRU: z r h).
GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}


def _stem(input_shape: tuple[int, ...], vocab_size: int | None, num_outputs: int, dtype: str):
    """Returns (input tensor, sequence tensor [B, T, F])."""
    shape = tuple(input_shape)
    if len(shape) == 1:  # integer tokens, e.g. the copy task: one-hot, as in Arjovsky et al. 2016
        inputs = keras.Input(shape=shape, name="input", dtype="int32")
        x = layers.CategoryEncoding(vocab_size or num_outputs, output_mode="one_hot", name="stem_onehot",
                                    dtype=dtype)(inputs)
        return inputs, x
    if len(shape) == 2:
        inputs = keras.Input(shape=shape, name="input", dtype=dtype)
        return inputs, inputs
    raise ValueError(
        f"recurrent models take [T, features] sequences or [T] tokens, got input shape {shape}; "
        "turn images into sequences with data.transform: {sequence: {mode: pixels | rows}}"
    )


def _recurrent_layer(kind: str, index: int, depth: int, *, units: int, return_sequences: bool, opts: dict):
    """One tagged recurrent layer (``block_<i>_rnn``), optionally bidirectional."""
    name = block_name(index, "rnn", depth)
    outer, name = name, (name + "_inner" if opts["bidirectional"] else name)  # the wrapper carries the tag
    rec_init = RecurrentInitializer(opts["recurrent_initializer"], opts["recurrent_gain"],
                                    opts["spectral_radius"], gates=GATES[kind])
    common = dict(
        units=units, return_sequences=return_sequences, dtype=opts["dtype"],
        kernel_initializer=make_initializer(opts["initializer"], **opts["initializer_options"]),
        recurrent_initializer=rec_init, dropout=opts["dropout"], recurrent_dropout=opts["recurrent_dropout"],
    )
    if kind == "simple_rnn":
        layer = layers.SimpleRNN(activation=opts["activation"], name=name, **common)
    elif kind == "lstm":
        fb = opts["forget_bias"]
        if fb == "unit":  # Keras' unit_forget_bias: forget-gate bias 1, the rest 0
            bias = dict(unit_forget_bias=True)
        else:
            bias = dict(unit_forget_bias=False, bias_initializer=GateBias(gates=4, gate=1, value=float(fb)))
        layer = layers.LSTM(activation=opts["activation"], name=name, **bias, **common)
    else:
        layer = layers.GRU(activation=opts["activation"], name=name, **common)
    if opts["bidirectional"]:
        layer = layers.Bidirectional(layer, name=outer, dtype=opts["dtype"])
    return layer


def recurrent_model(kind: str, *, input_shape: tuple[int, ...], num_outputs: int, depth: int, units: int,
                    output: str, vocab_size: int | None, dtype: str, **opts: Any) -> keras.Model:
    """Builds a stacked recurrent model of cell ``kind`` (simple_rnn | lstm | gru); see the builders."""
    check_choice("output", output, OUTPUTS)
    check_choice("activation", opts["activation"], CELL_ACTIVATIONS)
    check_choice("recurrent_initializer", opts["recurrent_initializer"], RECURRENT_BASES)
    check_depth(depth)
    opts = dict(opts, dtype=dtype, initializer_options=dict(opts.get("initializer_options") or {}))
    inputs, x = _stem(input_shape, vocab_size, num_outputs, dtype)
    for i in range(depth):
        last = i == depth - 1
        layer = _recurrent_layer(kind, i, depth, units=units,
                                 return_sequences=(not last) or output == "sequence", opts=opts)
        x = layer(x)
    # Linear head: logits for classification (the loss applies the softmax), the value for regression.
    # On a sequence it applies to every time step.
    out = layers.Dense(num_outputs, name="head_linear", dtype=dtype,
                       kernel_initializer=make_initializer(opts["initializer"], **opts["initializer_options"]))(x)
    return keras.Model(inputs, out, name=kind)


_COMMON_DOC = """
    Args:
        input_shape: ``[T, features]`` or ``[T]`` (integer tokens, one-hot encoded).
        num_outputs: outputs of the linear head (classes, or 1 for the adding problem).
        depth: stacked recurrent layers.
        units: hidden units per layer.
        activation: the cell's activation ({acts}).
        initializer: input-kernel initializer (registered name), ``initializer_options`` e.g. ``{{gain: 1}}``.
        recurrent_initializer: {bases}; ``identity`` + ``relu`` is the IRNN (Le et al. 2015).
        recurrent_gain: multiplies the recurrent base matrix.
        spectral_radius: if set, every recurrent gate block is rescaled to this spectral radius
            (overrides ``recurrent_gain``; Pascanu et al. 2013: < 1 is sufficient for vanishing with tanh).
        dropout, recurrent_dropout: the cell's input and recurrent dropout rates.
        bidirectional: wrap each layer in ``Bidirectional`` (concatenated outputs). Off by default; the
            through-time probe does not support it.
        output: ``last`` (predict from the last step) or ``sequence`` (a prediction per step).
        vocab_size: token vocabulary for ``[T]`` inputs (default ``num_outputs``).
        dtype: float32, or float64 for precise studies at init.
"""


def _doc(extra: str = "") -> str:
    return _COMMON_DOC.format(acts=", ".join(CELL_ACTIVATIONS), bases=" | ".join(RECURRENT_BASES)) + extra


@register("simple_rnn", family="rnn", paper="Elman 1990; Pascanu et al. 2013, On the difficulty of training RNNs")
def simple_rnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 1,
    units: int = 64,
    activation: str = "tanh",
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    recurrent_initializer: str = "orthogonal",
    recurrent_gain: float = 1.0,
    spectral_radius: float | None = None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    bidirectional: bool = False,
    output: str = "last",
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> keras.Model:
    """Stacked Elman RNNs h_t = act(W x_t + U h_{t-1} + b), then a linear head."""
    return recurrent_model("simple_rnn", **locals())


@register("lstm", family="rnn", paper="Hochreiter & Schmidhuber 1997, Long short-term memory")
def lstm(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 1,
    units: int = 64,
    activation: str = "tanh",
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    recurrent_initializer: str = "orthogonal",
    recurrent_gain: float = 1.0,
    spectral_radius: float | None = None,
    forget_bias: float | str = "unit",
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    bidirectional: bool = False,
    output: str = "last",
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> keras.Model:
    """Stacked LSTMs, then a linear head."""
    if forget_bias != "unit" and (isinstance(forget_bias, str) or isinstance(forget_bias, bool)):
        raise ValueError(f"forget_bias must be 'unit' (Keras' unit_forget_bias) or a number, got '{forget_bias}'")
    return recurrent_model("lstm", **locals())


@register("gru", family="rnn", paper="Cho et al. 2014, Learning phrase representations using RNN encoder-decoder")
def gru(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 1,
    units: int = 64,
    activation: str = "tanh",
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    recurrent_initializer: str = "orthogonal",
    recurrent_gain: float = 1.0,
    spectral_radius: float | None = None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    bidirectional: bool = False,
    output: str = "last",
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> keras.Model:
    """Stacked GRUs (Keras' reset_after form), then a linear head."""
    return recurrent_model("gru", **locals())


simple_rnn.__doc__ += _doc()
lstm.__doc__ += _doc("""        forget_bias: ``unit`` (Keras' unit_forget_bias: 1) or an explicit value, e.g. 0 or 2
            (Gers et al. 2000: a positive forget bias keeps the cell's memory, and its gradient, at init).
""")
gru.__doc__ += _doc()
