"""Highway networks: ``y = H(x) T(x) + x (1 - T(x))`` with a sigmoid transform gate (Srivastava et al. 2015).

The transform gate's bias starts negative (the paper: -1 to -3, deeper nets more negative), so at init the
gate is mostly shut and each block mostly carries its input: gradients flow along the carry path.
Each block: ``linear`` (H's pre-activation) -> [norm] -> ``act`` (= H), ``gate`` (sigmoid T, its own
layer so T is a tensor of the graph) and ``mix`` (:class:`zoo.layers.HighwayMix`).
"""

from __future__ import annotations

from typing import Any

import keras

from zoo import register
from zoo.common import Axes, axes, check_depth, cnn_head, cnn_input, mlp_head, mlp_input, namer
from zoo.layers.highway import HighwayMix


def highway_block(x: Any, index: int, depth: int, ax: Axes, *, conv: bool, gate_bias: float) -> Any:
    """One highway layer at constant width: H = act(norm(linear(x))), T = sigmoid(gate(x))."""
    name = namer(index, depth)
    units = int(x.shape[-1])
    make = (lambda n, **kw: ax.conv(units, n, **kw)) if conv else (lambda n, **kw: ax.dense(units, n, **kw))
    h = make(name("linear"))(x)
    h = ax.norm_act(h, name)
    h = ax.drop(h, name("dropout"))
    t = make(name("gate"), activation="sigmoid", bias_initializer=keras.initializers.Constant(gate_bias))(x)
    return HighwayMix(name=name("mix"), dtype=ax.dtype)([x, h, t])


@register("highway_mlp", family="mlp", paper="Srivastava, Greff & Schmidhuber 2015, Highway networks")
def highway_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 10,
    width: int = 64,
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    gate_bias: float = -2.0,
    norm: str = "none",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    dtype: str = "float32",
) -> keras.Model:
    """A highway MLP: linear stem to ``width``, ``depth`` highway blocks, linear head.

    Srivastava, Greff & Schmidhuber 2015, "Highway networks" / "Training very deep networks".

    Args:
        input_shape: shape of one example.
        num_outputs: logits of the head.
        depth: highway blocks.
        width: units (filters) of every block; the stem projects the input to it.
        activation, activation_options: H's activation and its options.
        initializer, initializer_options: kernel initializer of H and T; ``bias_init_std``: sigma_b of H.
        gate_bias: initial bias of the transform gate T (the paper: -1 to -3; default -2).
        norm, norm_groups, norm_position: normalisation inside H (the paper: none).
        dropout: rate after H's activation.
        dtype: float32 or float64.
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs, x = mlp_input(input_shape, ax, width)
    for i in range(depth):
        x = highway_block(x, i, depth, ax, conv=False, gate_bias=gate_bias)
    return keras.Model(inputs, mlp_head(x, num_outputs, ax), name="highway_mlp")


@register("highway_cnn", family="cnn", paper="Srivastava, Greff & Schmidhuber 2015, Highway networks (conv form)")
def highway_cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 10,
    width: int = 16,
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    gate_bias: float = -2.0,
    norm: str = "none",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    dtype: str = "float32",
) -> keras.Model:
    """A convolutional highway net: 3x3 stem conv to ``width`` filters, ``depth`` highway blocks of 3x3
    convolutions (H and T) at constant resolution, global average pooling, linear head.

    Srivastava, Greff & Schmidhuber 2015, "Training very deep networks" (convolutional highway layers).

    Args:
        input_shape: shape of one example.
        num_outputs: logits of the head.
        depth: highway blocks.
        width: units (filters) of every block; the stem projects the input to it.
        activation, activation_options: H's activation and its options.
        initializer, initializer_options: kernel initializer of H and T; ``bias_init_std``: sigma_b of H.
        gate_bias: initial bias of the transform gate T (the paper: -1 to -3; default -2).
        norm, norm_groups, norm_position: normalisation inside H (the paper: none).
        dropout: rate after H's activation.
        dtype: float32 or float64.
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs = cnn_input(input_shape, ax)
    x = ax.conv(width, "stem_conv")(inputs)
    for i in range(depth):
        x = highway_block(x, i, depth, ax, conv=True, gate_bias=gate_bias)
    return keras.Model(inputs, cnn_head(x, num_outputs, ax), name="highway_cnn")
