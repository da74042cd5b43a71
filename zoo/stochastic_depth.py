"""Stochastic depth: ResNets whose residual branches are dropped at random while training (Huang et al. 2016).

Block ``l`` (1-based) of ``L`` survives with probability ``p_l = 1 - (l / L)(1 - p_L)`` (``linear`` rule, the
paper's default with ``p_L = 0.5``) or ``p_L`` everywhere (``uniform``). The whole branch is dropped for the
mini-batch (``mode: batch``, the paper) or per example (``mode: sample``, DropPath); at inference every
branch is on and scaled by ``p_l``. The join is :class:`zoo.layers.StochasticDepth`, tagged
``stochastic_depth``; the branch output is the pass-through ``branch``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from zoo import register
from zoo.cnn import resnet_body, resnet_head, resnet_stem
from zoo.common import (Axes, axes, branch_scale_value, check_choice, check_depth, cnn_input, mlp_head, mlp_input,
                        namer)
from zoo.layers.stochastic_depth import MODES, StochasticDepth
from zoo.schema import SURVIVAL_RULES as RULES


def survival_probs(depth: int, survival_prob: float, rule: str) -> list[float]:
    """``p_l`` for blocks l = 1..depth: linear decay from 1 to ``survival_prob`` (p_L), or uniform."""
    check_choice("survival_rule", rule, RULES)
    if not 0.0 < survival_prob <= 1.0:
        raise ValueError(f"survival_prob must be in (0, 1], got {survival_prob}")
    if rule == "uniform":
        return [float(survival_prob)] * depth
    return [1.0 - (l / depth) * (1.0 - survival_prob) for l in range(1, depth + 1)]


def _combiner(probs: list[float], mode: str, dtype: str):
    def combine(skip: Any, branch: Any, index: int, name) -> Any:
        return StochasticDepth(probs[index], mode, name=name("stochastic_depth"), dtype=dtype)([skip, branch])

    return combine


def sd_mlp_block(x: Any, index: int, depth: int, ax: Axes, *, scale: float, combine) -> Any:
    """linear -> [norm] -> act -> linear2 [-> branch_scale] -> branch, joined to ``x`` by ``combine``."""
    name = namer(index, depth)
    width = int(x.shape[-1])
    h = ax.dense(width, name("linear"))(x)
    h = ax.norm_act(h, name)
    h = ax.drop(h, name("dropout"))
    h = ax.dense(width, name("linear2"))(h)
    if scale != 1.0:
        h = layers.Rescaling(scale, name=name("branch_scale"), dtype=ax.dtype)(h)
    h = ax.identity(h, name("branch"))
    return combine(x, h, index, name)


@register("stochastic_depth_mlp", family="mlp", paper="Huang et al. 2016, Deep networks with stochastic depth")
def stochastic_depth_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 10,
    width: int = 64,
    survival_prob: float = 0.5,
    survival_rule: str = "linear",
    mode: str = "batch",
    branch_scale: float | str = 1.0,
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
    """A residual MLP (as ``resnet_mlp``) whose branches are dropped at random while training.

    Huang et al. 2016, "Deep networks with stochastic depth" (linear decay, p_L = 0.5, batch-wise drop).

    Args:
        input_shape, num_outputs: from the dataset.
        depth: residual blocks.
        width: units of the stem and of every block.
        survival_prob: p_L, the last block's survival probability (the paper: 0.5).
        survival_rule: ``linear`` (p_l = 1 - (l/L)(1 - p_L)) or ``uniform`` (p_L everywhere).
        mode: ``batch`` (whole mini-batch, the paper) or ``sample`` (per example, DropPath).
        branch_scale: constant multiplying each branch, or ``inv_sqrt_depth`` (see ``resnet_mlp``).
        activation(_options), initializer(_options), bias_init_std, norm, norm_groups, norm_position,
            dropout, dtype: the shared axes (see :func:`zoo.mlp.plain_mlp`).
    """
    check_depth(depth)
    check_choice("mode", mode, MODES)
    probs = survival_probs(depth, survival_prob, survival_rule)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    scale = branch_scale_value(branch_scale, depth)
    inputs, x = mlp_input(input_shape, ax, width)
    combine = _combiner(probs, mode, dtype)
    for i in range(depth):
        x = sd_mlp_block(x, i, depth, ax, scale=scale, combine=combine)
    return keras.Model(inputs, mlp_head(x, num_outputs, ax), name="stochastic_depth_mlp")


@register("stochastic_depth_cnn", family="cnn", paper="Huang et al. 2016, Deep networks with stochastic depth")
def stochastic_depth_cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 54,
    width: int = 16,
    survival_prob: float = 0.5,
    survival_rule: str = "linear",
    mode: str = "batch",
    activation: str = "relu",
    activation_options: dict[str, Any] | None = None,
    initializer: str = "he_normal",
    initializer_options: dict[str, Any] | None = None,
    bias_init_std: float = 0.0,
    norm: str = "batch",
    norm_groups: int = 8,
    norm_position: str = "pre_act",
    dropout: float = 0.0,
    shortcut: str = "A",
    preact: bool = False,
    dtype: str = "float32",
) -> keras.Model:
    """The CIFAR ResNet of ``resnet_cnn`` with stochastic depth on every residual branch.

    Huang et al. 2016, "Deep networks with stochastic depth" (ResNet-110 = depth 54, p_L = 0.5, linear).

    Args: as :func:`resnet_cnn` plus ``survival_prob``, ``survival_rule`` and ``mode`` (see
    :func:`stochastic_depth_mlp`).
    """
    check_depth(depth)
    check_choice("mode", mode, MODES)
    probs = survival_probs(depth, survival_prob, survival_rule)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs = cnn_input(input_shape, ax)
    x = resnet_stem(inputs, ax, width, preact)
    x = resnet_body(x, depth, ax, width=width, shortcut=shortcut, preact=preact,
                    combine=_combiner(probs, mode, dtype))
    return keras.Model(inputs, resnet_head(x, num_outputs, ax, preact), name="stochastic_depth_cnn")
