"""Building blocks shared by the feedforward builders: the common axes as one frozen spec, layer factories,
MLP and CNN stems and heads.

Every feedforward builder takes the same axes (activation, initializer, normalisation and its position,
dropout, dtype); :class:`Axes` holds them once they are checked and makes the named layers, so a block
function only decides the wiring.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import keras
from keras import layers

from zoo.activations import ACTIVATIONS, make_activation
from zoo.blocks import block_name
from zoo.initializers import INITIALIZERS, make_bias_initializer, make_initializer
from zoo.norms import NORMS, make_norm
from zoo.schema import DTYPES, NORM_POSITIONS  # re-exported: the builders' shared choices


def check_choice(option: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raises ``ValueError`` naming ``option`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Axes:
    """The ablation axes every feedforward builder shares (see each builder's docstring for defaults).

    Attributes:
        activation / act_opts: registered activation and its options (``negative_slope``, ``alpha_init``).
        initializer / init_opts: registered kernel initializer and its options.
        bias_init_std: sigma_b of the bias initialisation (0: zeros).
        norm / norm_groups / norm_position: none | batch | layer | group, groups for ``group``, and
            ``pre_act`` (linear -> norm -> act, Ioffe & Szegedy 2015) or ``post_act`` (linear -> act -> norm).
        dropout: rate after each block's activation (AlphaDropout with SELU, Klambauer et al. 2017).
        dtype: float32, or float64 for precise studies at init.
    """

    activation: str = "relu"
    act_opts: dict = dataclasses.field(default_factory=dict)
    initializer: str = "glorot_uniform"
    init_opts: dict = dataclasses.field(default_factory=dict)
    bias_init_std: float = 0.0
    norm: str = "none"
    norm_groups: int = 8
    norm_position: str = "pre_act"
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        ACTIVATIONS.get(self.activation)  # unknown names fail here, listing the known ones
        INITIALIZERS.get(self.initializer)
        NORMS.get(self.norm)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("dtype", self.dtype, DTYPES)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    # ----------------------------------------------------------------------------------- layer factories

    def kernel_init(self) -> keras.initializers.Initializer:
        return make_initializer(self.initializer, **self.init_opts)

    def dense(self, units: int, name: str, **kw: Any) -> layers.Dense:
        kw.setdefault("kernel_initializer", self.kernel_init())
        kw.setdefault("bias_initializer", make_bias_initializer(self.bias_init_std))
        return layers.Dense(units, name=name, dtype=self.dtype, **kw)

    def conv(self, filters: int, name: str, kernel: int = 3, strides: int = 1, **kw: Any) -> layers.Conv2D:
        kw.setdefault("kernel_initializer", self.kernel_init())
        kw.setdefault("bias_initializer", make_bias_initializer(self.bias_init_std))
        return layers.Conv2D(filters, kernel, strides=strides, padding="same", name=name, dtype=self.dtype, **kw)

    def act(self, name: str) -> keras.layers.Layer:
        return make_activation(self.activation, name, self.dtype, **self.act_opts)

    def norm_layer(self, name: str, channels: int | None = None) -> keras.layers.Layer | None:
        # Group norm needs groups | channels; DenseNet's channel counts vary, so fall back to the gcd.
        groups = math.gcd(self.norm_groups, channels) if channels else self.norm_groups
        return make_norm(self.norm, name, self.dtype, groups=groups)

    def norm_act(self, x: Any, name: Callable[[str], str], suffix: str = "") -> Any:
        """``norm`` and ``act`` (tagged ``norm<suffix>``/``act<suffix>``) in the configured order."""
        norm = self.norm_layer(name("norm" + suffix), int(x.shape[-1]))
        if norm is not None and self.norm_position == "pre_act":
            x = norm(x)
        x = self.act(name("act" + suffix))(x)
        if norm is not None and self.norm_position == "post_act":
            x = norm(x)
        return x

    def norm_only(self, x: Any, name: str) -> Any:
        norm = self.norm_layer(name, int(x.shape[-1]))
        return norm(x) if norm is not None else x

    def drop(self, x: Any, name: str) -> Any:
        if self.dropout <= 0:
            return x
        kind = layers.AlphaDropout if self.activation == "selu" else layers.Dropout
        return kind(self.dropout, name=name, dtype=self.dtype)(x)

    def identity(self, x: Any, name: str) -> Any:
        """A named pass-through, so a tensor (e.g. a residual branch's output) is addressable by layer name."""
        return layers.Identity(name=name, dtype=self.dtype)(x)


def axes(*, activation: str, activation_options: dict | None, initializer: str, initializer_options: dict | None,
         bias_init_std: float, norm: str, norm_groups: int = 8, norm_position: str = "pre_act",
         dropout: float = 0.0, dtype: str = "float32") -> Axes:
    """The :class:`Axes` of a builder's keyword arguments (same names as the YAML options)."""
    return Axes(activation=activation, act_opts=dict(activation_options or {}), initializer=initializer,
                init_opts=dict(initializer_options or {}), bias_init_std=float(bias_init_std), norm=norm,
                norm_groups=int(norm_groups), norm_position=norm_position, dropout=float(dropout), dtype=dtype)


def namer(index: int, depth: int) -> Callable[[str], str]:
    """``part -> block_<index>_<part>`` for block ``index`` of a ``depth``-block model."""
    return lambda part: block_name(index, part, depth)


def check_depth(depth: int, minimum: int = 1) -> None:
    if not isinstance(depth, int) or depth < minimum:
        raise ValueError(f"depth must be an integer >= {minimum}, got {depth!r}")


def branch_scale_value(branch_scale: float | str, depth: int) -> float:
    """A residual branch multiplier: a number, or ``"inv_sqrt_depth"`` (1/sqrt(depth), Fixup-style)."""
    if branch_scale == "inv_sqrt_depth":
        return 1.0 / math.sqrt(depth)
    if isinstance(branch_scale, str):
        raise ValueError(f"branch_scale must be a number or 'inv_sqrt_depth', got '{branch_scale}'")
    return float(branch_scale)


# ------------------------------------------------------------------------------------------- MLP parts


def mlp_input(input_shape: tuple[int, ...], ax: Axes, width: int | None) -> tuple[Any, Any]:
    """``Input`` -> ``stem_flatten`` [-> ``stem_linear`` to ``width``, so a skip path has the block width]."""
    inputs = keras.Input(shape=tuple(input_shape), name="input", dtype=ax.dtype)
    x = layers.Flatten(name="stem_flatten", dtype=ax.dtype)(inputs)
    if width is not None:
        x = ax.dense(width, "stem_linear")(x)
    return inputs, x


def mlp_head(x: Any, num_outputs: int, ax: Axes) -> Any:
    """Logits (the loss applies the softmax)."""
    return ax.dense(num_outputs, "head_linear")(x)


# ------------------------------------------------------------------------------------------- CNN parts


def cnn_input(input_shape: tuple[int, ...], ax: Axes) -> Any:
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"CNN models need (height, width, channels) inputs, got input_shape {shape}")
    return keras.Input(shape=shape, name="input", dtype=ax.dtype)


def cnn_head(x: Any, num_outputs: int, ax: Axes) -> Any:
    """Global average pooling, then linear logits (He et al. 2016's CIFAR head)."""
    x = layers.GlobalAveragePooling2D(name="head_pool", dtype=ax.dtype)(x)
    return ax.dense(num_outputs, "head_linear")(x)


def stage_sizes(depth: int, stages: int = 3) -> list[int]:
    """Blocks per stage: ``depth`` split as evenly as possible, earlier stages taking the remainder."""
    return [depth // stages + (1 if s < depth % stages else 0) for s in range(stages)]
