"""Transformer encoder for sequences: Post-LN, Pre-LN or no normalisation; standard or ReZero residuals.

Vaswani et al. 2017 (Post-LN encoder); Xiong et al. 2020 (Pre-LN: at init the FFN gradient grows with the
layer index in Post-LN, not in Pre-LN); Bachlechner et al. 2020 (ReZero).

Layer names of encoder layer ``i`` (``block_<i>_<part>``), so the probe and the report can split gradients
by depth and by sub-layer kind (:data:`SUBLAYER_KIND`):

* ``attn_in`` / ``ffn_in``: identity layers on the residual stream entering each sub-layer; their outputs are
  the sub-layer inputs whose gradient dL/d(input) can be tapped;
* ``norm1`` / ``norm2``: the LayerNorms (before the sub-layer in Pre-LN, after the residual sum in Post-LN);
* ``attn``: the ``MultiHeadAttention``;
* ``linear`` -> ``act`` -> ``linear2``: the FFN (``linear`` is the block's first linear layer in the zoo's
  convention, so the probe records its pre-activation gradient and ``act``'s saturation);
* ``drop1`` / ``drop2``: dropout on each branch; ``rezero1`` / ``rezero2``: ReZero's alphas;
* ``add1`` / ``add2``: the residual sums.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from zoo import register
from zoo.activations import make_activation
from zoo.blocks import block_name
from zoo.common import check_choice, check_depth
from zoo.initializers import make_initializer
from zoo.layers.positions import LearnedPositions, SinusoidalPositions
from zoo.layers.rezero_alpha import ReZeroAlpha
from zoo.schema import POSITIONS, RESIDUALS
from zoo.schema import TRANSFORMER_NORM_POSITIONS as NORM_POSITIONS
from zoo.schema import TRANSFORMER_OUTPUTS as OUTPUTS

# Part name -> sub-layer kind, for plots of gradient by layer index split by attention and FFN.
SUBLAYER_KIND = {
    "attn_in": "attention", "norm1": "attention", "attn": "attention", "drop1": "attention",
    "rezero1": "attention", "add1": "attention",
    "ffn_in": "ffn", "norm2": "ffn", "linear": "ffn", "act": "ffn", "linear2": "ffn", "drop2": "ffn",
    "rezero2": "ffn", "add2": "ffn",
}


def _residual(stream, branch, name, opts: dict):
    """stream + [dropout] [alpha *] branch, then LayerNorm in Post-LN."""
    if opts["dropout"] > 0:
        branch = layers.Dropout(opts["dropout"], name=name("drop"), dtype=opts["dtype"])(branch)
    if opts["residual"] == "rezero":
        branch = ReZeroAlpha(name=name("rezero"), dtype=opts["dtype"])(branch)
    x = layers.Add(name=name("add"), dtype=opts["dtype"])([stream, branch])
    if opts["norm_position"] == "post":
        x = layers.LayerNormalization(epsilon=1e-5, name=name("norm"), dtype=opts["dtype"])(x)
    return x


def encoder_layer(x, index: int, depth: int, opts: dict):
    """One encoder layer: self-attention sub-layer, then the position-wise FFN sub-layer."""
    dt, pre = opts["dtype"], opts["norm_position"] == "pre"
    init = lambda: make_initializer(opts["initializer"], **opts["initializer_options"])  # noqa: E731
    for sub in (1, 2):
        name = lambda part, s=sub: block_name(index, f"{part}{s}", depth)  # noqa: E731
        tag = lambda part: block_name(index, part, depth)  # noqa: E731
        stream = layers.Identity(name=tag("attn_in" if sub == 1 else "ffn_in"), dtype=dt)(x)
        h = stream
        if pre:
            h = layers.LayerNormalization(epsilon=1e-5, name=name("norm"), dtype=dt)(h)
        if sub == 1:
            h = layers.MultiHeadAttention(
                num_heads=opts["heads"], key_dim=opts["d_model"] // opts["heads"], dropout=opts["dropout"],
                kernel_initializer=init(), name=tag("attn"), dtype=dt)(h, h)
        else:
            h = layers.Dense(opts["ffn_width"], kernel_initializer=init(), name=tag("linear"), dtype=dt)(h)
            h = make_activation(opts["activation"], tag("act"), dt)(h)
            h = layers.Dense(opts["d_model"], kernel_initializer=init(), name=tag("linear2"), dtype=dt)(h)
        x = _residual(stream, h, name, opts)
    return x


def _stem(input_shape, vocab_size, num_outputs, opts):
    shape, dt = tuple(input_shape), opts["dtype"]
    if len(shape) == 1:  # tokens
        inputs = keras.Input(shape=shape, name="input", dtype="int32")
        x = layers.Embedding(vocab_size or num_outputs, opts["d_model"], name="stem_embed", dtype=dt)(inputs)
    elif len(shape) == 2:
        inputs = keras.Input(shape=shape, name="input", dtype=dt)
        x = layers.Dense(opts["d_model"], name="stem_linear", dtype=dt,
                         kernel_initializer=make_initializer(opts["initializer"], **opts["initializer_options"]))(inputs)
    else:
        raise ValueError(
            f"the transformer takes [T, features] sequences or [T] tokens, got input shape {shape}; "
            "turn images into sequences with data.transform: {sequence: {mode: pixels | rows}}")
    if opts["positions"] == "sinusoidal":
        x = SinusoidalPositions(name="stem_positions", dtype=dt)(x)
    elif opts["positions"] == "learned":
        x = LearnedPositions(name="stem_positions", dtype=dt)(x)
    if opts["dropout"] > 0:
        x = layers.Dropout(opts["dropout"], name="stem_dropout", dtype=dt)(x)
    return inputs, x


@register("transformer", family="transformer",
          paper="Vaswani et al. 2017; Xiong et al. 2020, On layer normalization in the Transformer architecture")
def transformer(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 2,
    d_model: int = 64,
    heads: int = 4,
    ffn_width: int | None = None,
    activation: str = "relu",
    norm_position: str = "post",
    residual: str = "standard",
    dropout: float = 0.0,
    positions: str = "sinusoidal",
    initializer: str = "glorot_uniform",
    initializer_options: dict[str, Any] | None = None,
    output: str = "mean",
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> keras.Model:
    """A transformer encoder of ``depth`` layers with a linear head.

    Args:
        input_shape: ``[T, features]`` (projected by ``stem_linear``) or ``[T]`` tokens (``stem_embed``).
        num_outputs: classes (logits) or regression outputs.
        depth: encoder layers.
        d_model: width of the residual stream; must be divisible by ``heads``.
        heads: attention heads (key size ``d_model // heads``).
        ffn_width: hidden width of the FFN (default ``4 * d_model``).
        activation: FFN activation (registered name).
        norm_position: ``post`` (Vaswani et al. 2017: LayerNorm after each residual sum), ``pre`` (Xiong et al.
            2020: LayerNorm at the start of each branch, plus a final ``head_norm``) or ``none``.
        residual: ``standard`` (x + F(x)) or ``rezero`` (x + alpha F(x), alpha = 0 at init; Bachlechner et al.
            2020 use it with ``norm_position: none``).
        dropout: on the embeddings, attention weights and each branch.
        positions: ``sinusoidal``, ``learned`` or ``none``.
        initializer: kernel initializer of every Dense/attention projection; ``initializer_options``.
        output: ``mean`` (mean-pool the tokens, then the head: classification/regression) or ``sequence``
            (the head on every token: per-token prediction, e.g. the copy task).
        vocab_size: token vocabulary for ``[T]`` inputs (default ``num_outputs``).
        dtype: float32, or float64 for precise studies at init.
    """
    check_choice("norm_position", norm_position, NORM_POSITIONS)
    check_choice("residual", residual, RESIDUALS)
    check_choice("positions", positions, POSITIONS)
    check_choice("output", output, OUTPUTS)
    check_depth(depth)
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
    opts = dict(d_model=d_model, heads=heads, ffn_width=ffn_width or 4 * d_model, activation=activation,
                norm_position=norm_position, residual=residual, dropout=float(dropout), positions=positions,
                initializer=initializer, initializer_options=dict(initializer_options or {}), dtype=dtype)
    inputs, x = _stem(input_shape, vocab_size, num_outputs, opts)
    for i in range(depth):
        x = encoder_layer(x, i, depth, opts)
    if norm_position == "pre":  # Pre-LN's stream is never normalised inside the blocks
        x = layers.LayerNormalization(epsilon=1e-5, name="head_norm", dtype=dtype)(x)
    if output == "mean":
        x = layers.GlobalAveragePooling1D(name="head_pool", dtype=dtype)(x)
    out = layers.Dense(num_outputs, name="head_linear", dtype=dtype,
                       kernel_initializer=make_initializer(initializer, **opts["initializer_options"]))(x)
    return keras.Model(inputs, out, name="transformer")
