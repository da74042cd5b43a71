"""ReZero: ``x + alpha * F(x)`` with a trainable scalar ``alpha`` per block, initialised to 0
(Bachlechner et al. 2020).

Every block is exactly the identity at init, so signals and gradients pass unchanged through any depth
without normalisation. The join is :class:`zoo.layers.ReZero` (tagged ``rezero``, weight ``alpha``); the
branch output is the pass-through ``branch``.
"""

from __future__ import annotations

from typing import Any

import keras

from zoo import register
from zoo.cnn import resnet_body, resnet_head, resnet_stem
from zoo.common import Axes, axes, check_depth, cnn_input, mlp_head, mlp_input, namer
from zoo.layers.rezero import ReZero


def _combiner(alpha_init: float, dtype: str):
    def combine(skip: Any, branch: Any, index: int, name) -> Any:
        return ReZero(alpha_init, name=name("rezero"), dtype=dtype)([skip, branch])

    return combine


def rezero_mlp_block(x: Any, index: int, depth: int, ax: Axes, *, alpha_init: float) -> Any:
    """x + alpha * act(linear(x)): the paper's fully connected ReZero layer."""
    name = namer(index, depth)
    h = ax.dense(int(x.shape[-1]), name("linear"))(x)
    h = ax.norm_act(h, name)
    h = ax.drop(h, name("dropout"))
    h = ax.identity(h, name("branch"))
    return ReZero(alpha_init, name=name("rezero"), dtype=ax.dtype)([x, h])


@register("rezero_mlp", family="mlp", paper="Bachlechner et al. 2020, ReZero is all you need")
def rezero_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 10,
    width: int = 64,
    alpha_init: float = 0.0,
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
    """A ReZero MLP: linear stem to ``width``, ``depth`` blocks x + alpha act(W x), linear head.

    Bachlechner et al. 2020, "ReZero is all you need: fast convergence at large depth" (FC nets of up to
    10,000 layers, no normalisation).

    Args:
        input_shape, num_outputs: from the dataset.
        depth: ReZero blocks.
        width: units of the stem and of every block.
        alpha_init: initial alpha of every block (the paper: 0, identity at init).
        activation(_options), initializer(_options), bias_init_std, norm (the paper: none), norm_groups,
            norm_position, dropout, dtype: the shared axes (see :func:`zoo.mlp.plain_mlp`).
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs, x = mlp_input(input_shape, ax, width)
    for i in range(depth):
        x = rezero_mlp_block(x, i, depth, ax, alpha_init=alpha_init)
    return keras.Model(inputs, mlp_head(x, num_outputs, ax), name="rezero_mlp")


@register("rezero_cnn", family="cnn", paper="Bachlechner et al. 2020, ReZero is all you need (ResNet form)")
def rezero_cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 9,
    width: int = 16,
    alpha_init: float = 0.0,
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "he_normal",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    norm: str = "none",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    shortcut: str = "A",
    dtype: str = "float32",
) -> keras.Model:
    """The CIFAR ResNet of ``resnet_cnn`` with ReZero joins: x + alpha (conv -> act -> conv)(x), no
    activation after the sum (it would break the identity at init) and no normalisation by default.

    Bachlechner et al. 2020, "ReZero is all you need" (ReZero applied to residual networks).

    Args: as :func:`resnet_cnn` (without ``preact``) plus ``alpha_init`` (the paper: 0).
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs = cnn_input(input_shape, ax)
    x = resnet_stem(inputs, ax, width, preact=False)
    x = resnet_body(x, depth, ax, width=width, shortcut=shortcut, preact=False,
                    combine=_combiner(alpha_init, dtype), post_activation=False)
    return keras.Model(inputs, resnet_head(x, num_outputs, ax, preact=False), name="rezero_cnn")
