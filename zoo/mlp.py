"""Fully connected zoo models: plain and residual MLPs.

Glorot & Bengio 2010 (plain deep MLPs, saturation); He et al. 2016 (residual connections).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from zoo import register
from zoo.common import Axes, axes, branch_scale_value, check_depth, mlp_head, mlp_input, namer


def plain_block(x: Any, index: int, depth: int, ax: Axes, *, width: int) -> Any:
    """linear -> [norm] -> act -> [dropout]: one hidden layer of a plain MLP."""
    name = namer(index, depth)
    x = ax.dense(width, name("linear"))(x)
    x = ax.norm_act(x, name)
    return ax.drop(x, name("dropout"))


def residual_block(x: Any, index: int, depth: int, ax: Axes, *, width: int, post_activation: bool,
                   branch_scale: float = 1.0) -> Any:
    """x + linear2(act(norm(linear(x)))): identity skip, the residual MLP form of He et al. 2016.

    With ``post_activation`` the sum goes through the activation too (the original ResNet ordering);
    by default the identity path stays clean (He et al. 2016b, "Identity mappings"), which is what keeps
    gradients flowing for saturating activations.
    """
    name = namer(index, depth)
    h = ax.dense(width, name("linear"))(x)
    h = ax.norm_act(h, name)
    h = ax.drop(h, name("dropout"))
    h = ax.dense(width, name("linear2"))(h)
    if branch_scale != 1.0:
        h = layers.Rescaling(branch_scale, name=name("branch_scale"), dtype=ax.dtype)(h)
    x = layers.Add(name=name("add"), dtype=ax.dtype)([x, h])
    if post_activation:
        x = ax.act(name("post_act"))(x)
    return x


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
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs, x = mlp_input(input_shape, ax, None)
    for i in range(depth):
        x = plain_block(x, i, depth, ax, width=width)
    return keras.Model(inputs, mlp_head(x, num_outputs, ax), name="plain_mlp")


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
    check_depth(depth)
    scale = branch_scale_value(branch_scale, depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs, x = mlp_input(input_shape, ax, width)
    for i in range(depth):
        x = residual_block(x, i, depth, ax, width=width, post_activation=post_activation, branch_scale=scale)
    return keras.Model(inputs, mlp_head(x, num_outputs, ax), name="resnet_mlp")
