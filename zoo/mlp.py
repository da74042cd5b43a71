"""Fully connected zoo models: plain and residual MLPs.

Glorot & Bengio 2010 (plain deep MLPs, saturation); He et al. 2016 (residual connections).
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import layers

from zoo import register
from zoo.activations import make_activation
from zoo.blocks import block_name
from zoo.common import NORM_POSITIONS, check_choice
from zoo.initializers import make_bias_initializer, make_initializer
from zoo.norms import make_norm


def _dense(units: int, name: str, init: dict, dtype: str) -> layers.Dense:
    return layers.Dense(
        units,
        name=name,
        kernel_initializer=make_initializer(init["initializer"], **init["initializer_options"]),
        bias_initializer=make_bias_initializer(init["bias_init_std"]),
        dtype=dtype,
    )


def _stem(inputs: keras.KerasTensor, width: int | None, init: dict, dtype: str) -> keras.KerasTensor:
    x = layers.Flatten(name="stem_flatten", dtype=dtype)(inputs)
    if width is not None:  # residual nets need the skip path at the block width
        x = _dense(width, "stem_linear", init, dtype)(x)
    return x


def _head(x: keras.KerasTensor, num_outputs: int, init: dict, dtype: str) -> keras.KerasTensor:
    # Logits: the loss applies the softmax, so the head never saturates by construction.
    return _dense(num_outputs, "head_linear", init, dtype)(x)


def plain_block(x, index: int, depth: int, *, width: int, activation: str, act_opts: dict, norm: str,
                dropout: float, init: dict, dtype: str, norm_groups: int = 8, norm_position: str = "pre_act"):
    """linear -> [norm] -> act -> [dropout]: one hidden layer of a plain MLP."""
    name = lambda part: block_name(index, part, depth)  # noqa: E731
    x = _dense(width, name("linear"), init, dtype)(x)
    norm_layer = make_norm(norm, name("norm"), dtype, groups=norm_groups)
    if norm_layer is not None and norm_position == "pre_act":
        x = norm_layer(x)
    x = make_activation(activation, name("act"), dtype, **act_opts)(x)
    if norm_layer is not None and norm_position == "post_act":
        x = norm_layer(x)
    if dropout > 0:
        drop = layers.AlphaDropout if activation == "selu" else layers.Dropout
        x = drop(dropout, name=name("dropout"), dtype=dtype)(x)
    return x


def residual_block(x, index: int, depth: int, *, width: int, activation: str, act_opts: dict, norm: str,
                   dropout: float, init: dict, dtype: str, post_activation: bool, branch_scale: float = 1.0,
                   norm_groups: int = 8, norm_position: str = "pre_act"):
    """x + linear2(act(norm(linear(x)))): identity skip, the residual MLP form of He et al. 2016.

    With ``post_activation`` the sum goes through the activation too (the original ResNet ordering);
    by default the identity path stays clean (He et al. 2016b, "Identity mappings"), which is what keeps
    gradients flowing for saturating activations.
    """
    name = lambda part: block_name(index, part, depth)  # noqa: E731
    h = _dense(width, name("linear"), init, dtype)(x)
    norm_layer = make_norm(norm, name("norm"), dtype, groups=norm_groups)
    if norm_layer is not None and norm_position == "pre_act":
        h = norm_layer(h)
    h = make_activation(activation, name("act"), dtype, **act_opts)(h)
    if norm_layer is not None and norm_position == "post_act":
        h = norm_layer(h)
    if dropout > 0:
        h = layers.Dropout(dropout, name=name("dropout"), dtype=dtype)(h)
    h = _dense(width, name("linear2"), init, dtype)(h)
    if branch_scale != 1.0:
        h = layers.Rescaling(branch_scale, name=name("branch_scale"), dtype=dtype)(h)
    x = layers.Add(name=name("add"), dtype=dtype)([x, h])
    if post_activation:
        x = make_activation(activation, name("post_act"), dtype, **act_opts)(x)
    return x


def _init(initializer: str, initializer_options: dict | None, bias_init_std: float) -> dict:
    return {"initializer": initializer, "initializer_options": dict(initializer_options or {}),
            "bias_init_std": bias_init_std}


@register("plain_mlp", family="mlp", paper="Glorot & Bengio 2010, Understanding the difficulty of training deep FF nets")
def plain_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 4,
    width: int = 64,
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
    """A plain MLP: ``depth`` hidden blocks linear -> [norm] -> act, then a linear head.

    Args:
        input_shape: shape of one example (flattened by the stem).
        num_outputs: logits of the head.
        depth: number of hidden blocks.
        width: units per hidden block.
        activation: registered activation name; ``activation_options`` e.g. ``{negative_slope: 0.1}``.
        initializer: registered kernel initializer; ``initializer_options`` e.g. ``{gain: 1.2}``.
        bias_init_std: standard deviation of the bias initialisation (sigma_b), 0 = zeros.
        norm: none | batch | layer | group (``norm_groups`` groups), applied between linear and activation
            (``norm_position: pre_act``, Ioffe & Szegedy 2015) or after the activation (``post_act``).
        dropout: dropout rate after each activation (AlphaDropout with SELU).
        dtype: float32, or float64 for precise studies at init.
    """
    check_choice("norm_position", norm_position, NORM_POSITIONS)
    init = _init(initializer, initializer_options, bias_init_std)
    inputs = keras.Input(shape=tuple(input_shape), name="input", dtype=dtype)
    x = _stem(inputs, None, init, dtype)
    for i in range(depth):
        x = plain_block(x, i, depth, width=width, activation=activation, act_opts=dict(activation_options or {}),
                        norm=norm, dropout=dropout, init=init, dtype=dtype, norm_groups=norm_groups,
                        norm_position=norm_position)
    return keras.Model(inputs, _head(x, num_outputs, init, dtype), name="plain_mlp")


@register("resnet_mlp", family="mlp", paper="He et al. 2016, Deep residual learning for image recognition")
def resnet_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 4,
    width: int = 64,
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    norm: str = "none",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    post_activation: bool = False,
    branch_scale: float | str = 1.0,
    dtype: str = "float32",
) -> keras.Model:
    """A residual MLP: a linear stem to ``width``, ``depth`` residual blocks, a linear head.

    Args: as :func:`plain_mlp`, plus ``post_activation`` (activation after the sum, original ResNet order)
    and ``branch_scale``: a constant multiplying every residual branch. Without normalisation each branch
    adds its variance to the skip path, so the forward signal grows geometrically with depth;
    ``"inv_sqrt_depth"`` (1/sqrt(depth), as in Fixup-style analyses, Zhang et al. 2019) keeps it bounded.
    """
    if branch_scale == "inv_sqrt_depth":
        branch_scale = 1.0 / math.sqrt(depth)
    elif isinstance(branch_scale, str):
        raise ValueError(f"branch_scale must be a number or 'inv_sqrt_depth', got '{branch_scale}'")
    check_choice("norm_position", norm_position, NORM_POSITIONS)
    init = _init(initializer, initializer_options, bias_init_std)
    inputs = keras.Input(shape=tuple(input_shape), name="input", dtype=dtype)
    x = _stem(inputs, width, init, dtype)
    for i in range(depth):
        x = residual_block(x, i, depth, width=width, activation=activation,
                           act_opts=dict(activation_options or {}), norm=norm, dropout=dropout, init=init,
                           dtype=dtype, post_activation=post_activation, branch_scale=float(branch_scale),
                           norm_groups=norm_groups, norm_position=norm_position)
    return keras.Model(inputs, _head(x, num_outputs, init, dtype), name="resnet_mlp")
