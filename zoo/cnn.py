"""Convolutional zoo models: the plain CNN baseline and the CIFAR-style ResNet (He et al. 2016).

Both follow the ResNet paper's CIFAR layout: a 3x3 stem convolution, three stages of ``width``, ``2 width``
and ``4 width`` filters (16/32/64 by default) whose first block halves the resolution, global average
pooling and a linear head. ``depth`` counts the repeated blocks: a residual block holds two 3x3 convolutions,
so the paper's ResNet-20/32/56/110 (6n+2 layers) are ``depth`` 9/15/27/54; a plain block holds one
convolution, so the paper's plain-20/56 are ``depth`` 18/54. The ResNet body is shared with the stochastic
depth and ReZero CNNs through its ``combine`` hook.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import layers

from zoo import register
from zoo.common import Axes, axes, check_choice, check_depth, cnn_head, cnn_input, namer, stage_sizes
from zoo.layers.shortcut import PadShortcut
from zoo.schema import SHORTCUTS

# combine(skip, branch, index, name) -> block output: how a residual block joins its two paths.
Combine = Callable[[Any, Any, int, Callable[[str], str]], Any]


def add_combine(skip: Any, branch: Any, index: int, name: Callable[[str], str]) -> Any:
    """The ResNet join: ``skip + branch`` (tagged ``add``)."""
    return layers.Add(name=name("add"), dtype=branch.dtype)([skip, branch])


def _shortcut(x: Any, filters: int, stride: int, kind: str, ax: Axes, name: Callable[[str], str]) -> Any:
    """Identity when shapes match; else option A (subsample + zero-pad channels) or B (1x1 projection)."""
    if stride == 1 and int(x.shape[-1]) == filters:
        return x
    if kind == "A":
        return PadShortcut(filters, stride, name=name("shortcut"), dtype=ax.dtype)(x)
    x = ax.conv(filters, name("shortcut"), kernel=1, strides=stride)(x)
    return ax.norm_only(x, name("shortcut_norm"))


def resnet_block(x: Any, index: int, depth: int, ax: Axes, *, filters: int, stride: int, shortcut: str,
                 preact: bool, combine: Combine, post_activation: bool) -> Any:
    """One two-convolution residual block.

    Original order (He et al. 2016): conv -> norm -> act -> conv -> norm, added to the shortcut, then ``act``
    (``post_act``) when ``post_activation``. Pre-activation order (He et al. 2016b, "Identity mappings"):
    norm -> act -> conv -> norm -> act -> conv, added to the shortcut, nothing after the sum. The branch's
    output is the pass-through layer ``branch``.
    """
    name = namer(index, depth)
    if preact:
        a = ax.norm_act(x, name)
        # A projection sees the pre-activated input (as in the paper's code); option A subsamples x itself.
        skip = _shortcut(a if shortcut == "B" else x, filters, stride, shortcut, ax, name)
        h = ax.conv(filters, name("linear"), strides=stride)(a)
        h = ax.norm_act(h, name, "2")
        h = ax.drop(h, name("dropout"))
        h = ax.conv(filters, name("linear2"))(h)
    else:
        skip = _shortcut(x, filters, stride, shortcut, ax, name)
        h = ax.conv(filters, name("linear"), strides=stride)(x)
        h = ax.norm_act(h, name)
        h = ax.drop(h, name("dropout"))
        h = ax.conv(filters, name("linear2"))(h)
        h = ax.norm_only(h, name("norm2"))
    h = ax.identity(h, name("branch"))
    y = combine(skip, h, index, name)
    if post_activation and not preact:
        y = ax.act(name("post_act"))(y)
    return y


def resnet_body(x: Any, depth: int, ax: Axes, *, width: int, shortcut: str = "A", preact: bool = False,
                combine: Combine = add_combine, post_activation: bool = True) -> Any:
    """The three stages of residual blocks (``width``, 2x, 4x filters; stride 2 at the start of stages 2, 3)."""
    check_choice("shortcut", shortcut, SHORTCUTS)
    index = 0
    for stage, n in enumerate(stage_sizes(depth)):
        for j in range(n):
            x = resnet_block(x, index, depth, ax, filters=width * 2**stage, stride=2 if stage > 0 and j == 0 else 1,
                             shortcut=shortcut, preact=preact, combine=combine, post_activation=post_activation)
            index += 1
    return x


def resnet_stem(inputs: Any, ax: Axes, width: int, preact: bool) -> Any:
    """3x3 conv to ``width`` filters (+ norm and act unless the blocks pre-activate)."""
    x = ax.conv(width, "stem_conv")(inputs)
    return x if preact else ax.norm_act(x, lambda part: f"stem_{part}")


def resnet_head(x: Any, num_outputs: int, ax: Axes, preact: bool) -> Any:
    """Pre-activation nets end with norm -> act before pooling (the last sum is not activated otherwise)."""
    if preact:
        x = ax.norm_act(x, lambda part: f"head_{part}")
    return cnn_head(x, num_outputs, ax)


@register("plain_cnn", family="cnn", paper="He et al. 2016 (plain CIFAR baseline), Deep residual learning")
def plain_cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 18,
    width: int = 16,
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
    """The plain CIFAR CNN of He et al. 2016: ``depth`` blocks conv3x3 -> [norm] -> act, no skips.

    He et al. 2016, "Deep residual learning for image recognition" (plain-20 = depth 18: the 6n+2 layers
    minus the stem and the head).

    Args:
        input_shape: (height, width, channels), e.g. (8, 8, 1) or (32, 32, 3).
        num_outputs: logits of the head.
        depth: convolution blocks, split over three stages (16/32/64 filters by default).
        width: filters of the first stage (the paper: 16).
        activation, activation_options: registered activation and its options.
        initializer, initializer_options: kernel initializer (the paper: He normal); ``bias_init_std``: sigma_b.
        norm, norm_groups, norm_position: normalisation (the paper: batch), groups for ``group``, and
            ``pre_act`` (conv -> norm -> act) or ``post_act`` (conv -> act -> norm).
        dropout: rate after each activation.
        dtype: float32 or float64.
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs = cnn_input(input_shape, ax)
    x = resnet_stem(inputs, ax, width, preact=False)
    index = 0
    for stage, n in enumerate(stage_sizes(depth)):
        for j in range(n):
            name = namer(index, depth)
            x = ax.conv(width * 2**stage, name("linear"), strides=2 if stage > 0 and j == 0 else 1)(x)
            x = ax.norm_act(x, name)
            x = ax.drop(x, name("dropout"))
            index += 1
    return keras.Model(inputs, cnn_head(x, num_outputs, ax), name="plain_cnn")


@register("resnet_cnn", family="cnn", paper="He et al. 2016, Deep residual learning (CIFAR ResNet 6n+2)")
def resnet_cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 9,
    width: int = 16,
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
    """The CIFAR ResNet: stem conv, ``depth`` two-conv residual blocks in three stages, pooling, linear head.

    He et al. 2016, "Deep residual learning for image recognition", section 4.2 (ResNet-20/32/56/110 =
    depth 9/15/27/54); ``preact``: He et al. 2016b, "Identity mappings in deep residual networks".

    Args:
        input_shape, num_outputs, width, activation(_options), initializer(_options), bias_init_std, norm,
            norm_groups, norm_position, dropout, dtype: as :func:`plain_cnn` (dropout between the two convs).
        depth: residual blocks (the paper's 6n+2 layers are depth 3n).
        shortcut: ``A`` (identity; subsample + zero-pad channels where a stage starts, no parameters, the
            paper's CIFAR choice) or ``B`` (1x1 projection + norm where the shape changes, identity elsewhere).
        preact: pre-activation blocks (norm -> act -> conv twice, clean identity path, final norm -> act).
    """
    check_depth(depth)
    ax = axes(activation=activation, activation_options=activation_options, initializer=initializer,
              initializer_options=initializer_options, bias_init_std=bias_init_std, norm=norm,
              norm_groups=norm_groups, norm_position=norm_position, dropout=dropout, dtype=dtype)
    inputs = cnn_input(input_shape, ax)
    x = resnet_stem(inputs, ax, width, preact)
    x = resnet_body(x, depth, ax, width=width, shortcut=shortcut, preact=preact)
    return keras.Model(inputs, resnet_head(x, num_outputs, ax, preact), name="resnet_cnn")
