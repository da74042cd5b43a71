"""DenseNet: every layer sees the concatenation of all earlier features of its stage (Huang et al. 2017).

Each repeated block is one "dense layer": pre-activation [norm] -> ``act`` -> ``linear`` producing
``growth_rate`` (k) new features (with ``bottleneck``: a 4k-wide ``linear`` first, then [norm] -> ``act2`` ->
``linear2`` to k, DenseNet-B), concatenated onto its input (``concat``). ``depth`` dense layers are split
into ``stages`` dense blocks; between them a transition ([norm] -> act -> linear to ``floor(compression *
features)``, + 2x2 average pooling in the CNN) is tagged as part of the stage's last block
(``block_<i>_transition_*``). DenseNet-BC = ``bottleneck: true, compression: 0.5``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import keras
from keras import layers

from zoo import register
from zoo.common import Axes, axes, check_depth, cnn_head, cnn_input, mlp_head, mlp_input, namer, stage_sizes


def dense_layer(x: Any, index: int, depth: int, ax: Axes, *, growth_rate: int, bottleneck: bool,
                conv: bool) -> Any:
    """One dense layer: k new features from all earlier ones, concatenated onto them."""
    name = namer(index, depth)
    linear = (lambda n, units, kernel: ax.conv(units, n, kernel=kernel)) if conv else \
        (lambda n, units, kernel: ax.dense(units, n))
    h = ax.norm_act(x, name)
    if bottleneck:
        h = linear(name("linear"), 4 * growth_rate, 1)(h)
        h = ax.drop(h, name("dropout"))
        h = ax.norm_act(h, name, "2")
        h = linear(name("linear2"), growth_rate, 3)(h)
        h = ax.drop(h, name("dropout2"))
    else:
        h = linear(name("linear"), growth_rate, 3)(h)
        h = ax.drop(h, name("dropout"))
    return layers.Concatenate(name=name("concat"), dtype=ax.dtype)([x, h])


def transition(x: Any, index: int, depth: int, ax: Axes, *, compression: float, conv: bool) -> Any:
    """Between dense blocks: [norm] -> act -> linear to floor(compression * features) [-> 2x2 average pool]."""
    block = namer(index, depth)
    name: Callable[[str], str] = lambda part: block(f"transition_{part}")  # noqa: E731
    units = int(math.floor(compression * int(x.shape[-1])))
    x = ax.norm_act(x, name)
    if conv:
        x = ax.conv(units, name("linear"), kernel=1)(x)
        return layers.AveragePooling2D(2, padding="same", name=name("pool"), dtype=ax.dtype)(x)
    return ax.dense(units, name("linear"))(x)


def densenet_body(x: Any, depth: int, ax: Axes, *, growth_rate: int, stages: int, bottleneck: bool,
                  compression: float, conv: bool) -> Any:
    """``depth`` dense layers in ``stages`` dense blocks with transitions between them, then norm -> act."""
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    ends = set(itertools.accumulate(stage_sizes(depth, stages)))  # index after each dense block
    for i in range(depth):
        x = dense_layer(x, i, depth, ax, growth_rate=growth_rate, bottleneck=bottleneck, conv=conv)
        if i + 1 in ends and i + 1 < depth:
            x = transition(x, i, depth, ax, compression=compression, conv=conv)
    # The last dense block's output is pre-activation features: normalise and activate before the head.
    return ax.norm_act(x, lambda part: f"head_{part}")


@register("densenet_mlp", family="mlp", paper="Huang et al. 2017, Densely connected convolutional networks")
def densenet_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 12,
    width: int = 64,
    growth_rate: int = 12,
    stages: int = 1,
    bottleneck: bool = False,
    compression: float = 1.0,
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    norm: str = "none",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    dtype: str = "float32",
) -> keras.Model:
    """A fully connected DenseNet: linear stem to ``width`` features, ``depth`` dense layers, linear head.

    Huang et al. 2017, "Densely connected convolutional networks" (dense connectivity, growth rate,
    DenseNet-BC), in fully connected form.

    Args:
        input_shape, num_outputs: from the dataset.
        depth: dense layers (repeated blocks).
        width: features out of the stem (what the first dense layer sees).
        growth_rate: k, features each dense layer adds (the paper: 12).
        stages: dense blocks (transitions between them; 1: none).
        bottleneck: 4k-wide linear before the k-wide one (DenseNet-B).
        compression: transition output = floor(compression * features) (DenseNet-C: 0.5).
        activation(_options), initializer(_options), bias_init_std, norm, norm_groups, norm_position,
            dropout, dtype: the shared axes (see :func:`zoo.mlp.plain_mlp`); norm and act come before each
            linear layer (pre-activation order).
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs, x = mlp_input(input_shape, ax, width)
    x = densenet_body(x, depth, ax, growth_rate=growth_rate, stages=stages, bottleneck=bottleneck,
                      compression=compression, conv=False)
    return keras.Model(inputs, mlp_head(x, num_outputs, ax), name="densenet_mlp")


@register("densenet_cnn", family="cnn", paper="Huang et al. 2017, Densely connected convolutional networks")
def densenet_cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 36,
    width: int = 16,
    growth_rate: int = 12,
    stages: int = 3,
    bottleneck: bool = False,
    compression: float = 1.0,
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "he_normal",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    norm: str = "batch",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    dtype: str = "float32",
) -> keras.Model:
    """The CIFAR DenseNet: 3x3 stem conv to ``width`` filters, ``stages`` dense blocks of 3x3 (or 1x1 + 3x3)
    convolutions with transitions, norm -> act, global average pooling, linear head.

    Huang et al. 2017, "Densely connected convolutional networks" (DenseNet-40, k = 12: depth 36 = 3 x 12;
    DenseNet-BC: ``bottleneck: true, compression: 0.5, width: 2k``).

    Args: as :func:`densenet_mlp`; ``width`` is the stem's filters (the paper: 16, or 2k for BC), the
    defaults are the paper's (batch norm, He normal init, 3 stages).
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs = cnn_input(input_shape, ax)
    x = ax.conv(width, "stem_conv")(inputs)
    x = densenet_body(x, depth, ax, growth_rate=growth_rate, stages=stages, bottleneck=bottleneck,
                      compression=compression, conv=True)
    return keras.Model(inputs, cnn_head(x, num_outputs, ax), name="densenet_cnn")
