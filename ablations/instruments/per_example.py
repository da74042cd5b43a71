"""Exact per-example gradient norms from one backward pass, and the gradient noise statistics built on them.

Goodfellow 2015, "Efficient per-example gradient computations" (the outer-product trick); Rochette et al.
2019 / Li et al. 2022 ("Large language models can be strong differentially private learners": the Gram
"ghost norm" for sequences); McCandlish et al. 2018, "An empirical model of large-batch training" (B_simple).

What the step already has is enough: for a linear layer ``y = einsum(a, W) + b`` and the batch-mean loss
``L = (1/B) sum_i l_i``, the batch gradient is ``dL/dW = sum_i c_i`` with ``c_i`` the einsum of example ``i``'s
input ``a_i`` and its output gradient ``g_i = dL/dy_i``; the gradient of ``l_i`` alone is ``B c_i``. The
functions here return ``||c_i||^2`` ("contributions"), which are additive over replicas and need no batch
size; :func:`noise_statistics` applies the factor ``B`` (the global batch) after the all-reduce.

Exact (to float rounding), whatever the layer's position in the net:

* ``Dense`` on ``[B, in]``: ``||a_i||^2 ||g_i||^2``; on ``[B, ..., in]`` (sequences) the positions ``t`` give
  ``||sum_t a_it g_it^T||^2``, computed either from Gram matrices ``sum_{t,s} (a_t.a_s)(g_t.g_s)`` or from the
  explicit per-example gradient, whichever the static shapes make cheaper (:func:`choose_method`);
* ``EinsumDense`` of any equation whose kernel letters are contracted with the input or kept in the output
  (MultiHeadAttention's query/key/value/output projections, keras-hub's projections); letters shared by
  input, kernel and output (per-head weights) are handled as independent groups;
* ``Conv1D``/``Conv2D`` (any strides, dilation, ``same``/``valid``/``causal`` padding, ``groups``) and
  ``DepthwiseConv1D``/``DepthwiseConv2D``: input patches are unfolded (``tf.image.extract_patches``) and
  the output positions treated as a sequence;
* biases of all of them (``||sum_t g_it||^2``);
* ``LayerNormalization`` (gamma, beta: sums over positions of ``x_hat g`` and ``g``) and ``Embedding``
  (a token-equality-masked Gram matrix).

Not supported (:func:`unsupported_reason` says why): layers with a fused non-linear activation (their
pre-activation gradient is not in the graph: zoo layers keep the activation separate); Conv3D and transposed
convolutions; SeparableConv (its intermediate tensor is not tapped); BatchNorm/GroupNorm and ReZero/gate
scalars; bidirectional layers and recurrent dropout. ``SimpleRNN``, ``LSTM`` and ``GRU`` kernels are exact
from the through-time probe's total dL/dh_t (:func:`simple_rnn_sq_norms`, :func:`lstm_sq_norms`: the LSTM's
dL/dc_t by one backward scan, :func:`gru_sq_norms`), not from the layer's input and output alone: their
weights act at every step inside one layer call.

BatchNorm in training mode couples the examples: the ``c_i`` are then the examples' terms of the batch
gradient, not the gradients of the ``l_i`` alone (no per-example gradient exists without fixing the batch
statistics). Squared norms are float32 sums: per-example entries below ~1e-19 underflow (the probe's norms
rescue them; these do not).

Cost, measured on the 2-core CPU (a training step with the taps, every covered layer's norms and the noise
statistics, against the plain step, batch 64): plain_mlp 20x256 1.11-1.13x, transformer (2 layers, d_model
64, T = 8) 1.14-1.21x, resnet_cnn depth 9 width 16 on 8x8 without BatchNorm 1.9x (the convolutions take the
explicit per-example gradient, as many multiply-adds as the weight gradient itself, plus the patches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import string
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ablations import compat
from ablations.instruments.base import Column, EveryOptions, Finish, Instrument, Reducer, StepContext
from ablations.instruments.kernels import sq_sums
from ablations.lazy import keras, pd, tf  # TensorFlow loads when a step is built (the registry imports this)

GRAM, EXPLICIT, OUTER = "gram", "explicit", "outer"

# Columns of :func:`noise_statistics`, in order.
NOISE_STATS = ("mean_norm", "std_norm", "trace_sigma", "grad_sq", "b_simple", "snr")


# --------------------------------------------------------------------------------------------- the core


def choose_method(positions: int | None, n_in: int, n_out: int) -> str:
    """The cheaper exact method for ``||sum_p a_p g_p^T||_F^2`` per example, from static sizes.

    Goodfellow 2015 (``outer``: one position, ``||a|| ||g||``); Li et al. 2022, "Large language models can be
    strong differentially private learners" (``gram``: ghost norm).

    Per example and group, Gram costs ``P^2 (C + F)`` multiply-adds and holds ``2 P^2`` numbers; the explicit
    gradient costs ``P C F`` and holds ``C F``. Gram is chosen when ``P (C + F) < C F``; then ``P < C F / (C + F)``
    and its memory ``2 P^2`` is also below half the explicit one (``(C + F)^2 >= 4 C F``). An unknown (dynamic)
    ``P`` takes the explicit form, whose memory does not grow with it.
    """
    if positions == 1:
        return OUTER
    if positions is None:
        return EXPLICIT
    return GRAM if positions * (n_in + n_out) < n_in * n_out else EXPLICIT


def grouped_sq_norms(a: tf.Tensor, g: tf.Tensor, method: str | None = None) -> tf.Tensor:
    """``[B]`` float32 ``sum_h ||sum_p a[b,h,p,:] g[b,h,p,:]^T||_F^2`` for ``a [B,H,P,C]``, ``g [B,H,P,F]``.

    Rochette et al. 2019, "Efficient per-example gradient computations in convolutional neural networks".

    Every supported layer reduces to this: ``P`` positions (tokens, output pixels), ``C`` contracted input
    features, ``F`` kernel output features, ``H`` independent groups (heads with own weights, conv groups,
    depthwise channels). ``method`` None picks by static cost (:func:`choose_method`).
    """
    dtype = tf.float64 if a.dtype == tf.float64 else tf.float32  # float16 taps: reduce in float32
    a, g = tf.cast(a, dtype), tf.cast(g, dtype)
    p, c, f = a.shape[2], a.shape[3], g.shape[3]
    method = method or choose_method(p, c, f)
    if method == OUTER:  # one position: the per-example gradient is an outer product per group
        out = tf.reduce_sum(tf.reduce_sum(tf.square(a), [2, 3]) * tf.reduce_sum(tf.square(g), [2, 3]), 1)
    elif method == GRAM:
        ga = tf.matmul(a, a, transpose_b=True)  # [B, H, P, P]: a_p . a_q
        gg = tf.matmul(g, g, transpose_b=True)
        out = tf.reduce_sum(ga * gg, [1, 2, 3])
    elif method == EXPLICIT:
        w = tf.matmul(a, g, transpose_a=True)  # [B, H, C, F]: the per-example gradient itself
        out = tf.reduce_sum(tf.square(w), [1, 2, 3])
    else:
        raise ValueError(f"method must be one of {OUTER}, {GRAM}, {EXPLICIT}; got {method!r}")
    return tf.cast(out, tf.float32)


def _sq_rows(t: tf.Tensor) -> tf.Tensor:
    """[B] float32 sum of squares of each example's slice."""
    t = t if t.dtype == tf.float64 else tf.cast(t, tf.float32)
    return tf.cast(tf.reduce_sum(tf.square(tf.reshape(t, [tf.shape(t)[0], -1])), 1), tf.float32)


# -------------------------------------------------------------------------------------------- einsum


def _expand_ellipsis(term: str, rank: int, spare: str) -> str:
    if "..." not in term:
        return term
    n = rank - (len(term) - 3)
    return term.replace("...", spare[:n])


def einsum_letters(equation: str, input_rank: int) -> dict[str, str]:
    """Static roles of the letters of an EinsumDense equation ``lhs,kernel->out`` (ellipsis expanded).

    Returns ``lhs, kernel, out`` and the letter groups: ``batch`` (the first input letter), ``pos`` (input
    and output, not kernel: positions), ``con`` (input and kernel: contracted), ``free`` (kernel and output),
    ``grp`` (all three: per-group weights), ``in_only`` and ``out_only`` (summed or broadcast; the einsums
    handle them).
    """
    lhs, rest = equation.replace(" ", "").split(",")
    ker, out = rest.split("->")
    spare = "".join(ch for ch in string.ascii_letters if ch not in equation)
    lhs_x = _expand_ellipsis(lhs, input_rank, spare)
    out = out.replace("...", lhs_x[: len(lhs_x) - (len(lhs) - 3)]) if "..." in lhs else out
    lhs = lhs_x
    if "..." in ker or "..." in out:
        raise NotImplementedError(f"ellipsis outside the input term: {equation}")
    b = lhs[0]
    if out[0] != b or b in ker:
        raise NotImplementedError(f"the first input letter must be the batch, kept in the output: {equation}")
    if any(ch not in lhs and ch not in out for ch in ker):
        raise NotImplementedError(f"kernel letters summed over in the forward pass: {equation}")
    pick = lambda cond, src: "".join(ch for ch in src if cond(ch))  # noqa: E731
    return dict(
        lhs=lhs, kernel=ker, out=out, batch=b,
        pos=pick(lambda ch: ch != b and ch in out and ch not in ker, lhs),
        con=pick(lambda ch: ch in ker and ch not in out, lhs),
        free=pick(lambda ch: ch not in lhs, ker),
        grp=pick(lambda ch: ch in ker and ch in out, lhs),
    )


def einsum_sq_norms(equation: str, inputs: tf.Tensor, grad_out: tf.Tensor, bias_axes: str | None = None,
                    method: str | None = None) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Per-example squared norms of the kernel (and bias) contributions of ``out = einsum(eq, x, W) + b``.

    Rochette et al. 2019; Li et al. 2022 (ghost norm).

    Args:
        equation: the layer's einsum equation (EinsumDense ``equation``), input letter 0 the batch.
        inputs: the layer's input ``[B, ...]``.
        grad_out: dL/d(output) of the batch loss, ``[B, ...]`` (the output's shape).
        bias_axes: output letters of the bias (EinsumDense ``bias_axes``), None without a bias.
        method: ``gram``/``explicit``/``outer`` or None (static cost, :func:`choose_method`).

    Returns:
        ``([B] kernel, [B] bias or None)`` float32 ``||c_i||^2``.
    """
    r = einsum_letters(equation, len(inputs.shape))
    size = {}
    for term, t in ((r["lhs"], inputs), (r["out"], grad_out)):
        size.update({ch: t.shape[k] for k, ch in enumerate(term)})
    b, grp, pos, con, free = r["batch"], r["grp"], r["pos"], r["con"], r["free"]

    def n(letters: str) -> int | None:  # static size of a letter group (None: some size only known at run time)
        dims = [size[ch] for ch in letters]
        return None if None in dims else math.prod(dims)

    n_grp, n_pos, n_con, n_free = n(grp), n(pos), n(con), n(free)
    if None in (n_grp, n_con, n_free):
        raise ValueError(f"{equation}: feature and group sizes must be static, got {dict(size)}")
    nb = tf.shape(inputs)[0]
    p = n_pos if n_pos is not None else -1  # positions may be dynamic (variable sequence length)
    # One einsum each puts the letters in [B, H, P, C] / [B, H, P, F] order (summing input-only letters).
    a = tf.reshape(tf.einsum(f"{r['lhs']}->{b}{grp}{pos}{con}", inputs), [nb, n_grp, p, n_con])
    g = tf.reshape(tf.einsum(f"{r['out']}->{b}{grp}{pos}{free}", grad_out), [nb, n_grp, p, n_free])
    kernel = grouped_sq_norms(a, g, method or choose_method(n_pos, n_con, n_free))
    bias = None
    if bias_axes:
        bias = _sq_rows(tf.einsum(f"{r['out']}->{b}{bias_axes}", grad_out))
    return kernel, bias


def dense_equation(input_rank: int) -> str:
    """The einsum of ``keras.layers.Dense`` on a rank-``input_rank`` input (last axis contracted)."""
    lhs = string.ascii_lowercase[:input_rank]
    return f"{lhs},{lhs[-1]}Z->{lhs[:-1]}Z"


# ---------------------------------------------------------------------------------------- convolutions


def _channels_last(t: tf.Tensor, layer: Any) -> tf.Tensor:
    if getattr(layer, "data_format", "channels_last") == "channels_last":
        return t
    rank = len(t.shape)
    return tf.transpose(t, [0, *range(2, rank), 1])


def _patches(layer: Any, x: tf.Tensor) -> tf.Tensor:
    """``[B, P, kh*kw, C_in]``: the input patch of every output position (channels-last input ``x``)."""
    k, s, d = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
    padding = layer.padding
    if layer.rank == 1:
        if padding == "causal":  # Keras pads left by d (k - 1), then convolves 'valid'
            x = tf.pad(x, [[0, 0], [d[0] * (k[0] - 1), 0], [0, 0]])
            padding = "valid"
        x, k, s, d = x[:, None], [1, *k], [1, *s], [1, *d]  # a 1 x T image
    patches = tf.image.extract_patches(x, sizes=[1, *k, 1], strides=[1, *s, 1], rates=[1, *d, 1],
                                       padding=padding.upper())
    c_in = x.shape[-1]
    return tf.reshape(patches, [tf.shape(x)[0], -1, k[0] * k[1], c_in])  # depth order: (kh, kw, c_in)


def conv_sq_norms(layer: Any, inputs: tf.Tensor, grad_out: tf.Tensor,
                  method: str | None = None) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Per-example squared norms of a Conv1D/Conv2D or DepthwiseConv1D/2D layer's kernel and bias contributions.

    Rochette et al. 2019, "Efficient per-example gradient computations in convolutional neural networks".

    The kernel gradient of example i is ``sum_p patch_ip g_ip^T`` over output positions p: the sequence case
    with ``C = kh kw C_in / groups`` and ``F = C_out / groups`` (depthwise: one group per input channel,
    ``C = kh kw``, ``F`` = depth multiplier). Returns ``([B] kernel, [B] bias or None)`` float32.
    """
    x, g = _channels_last(inputs, layer), _channels_last(grad_out, layer)
    pt = _patches(layer, x)  # [B, P, K, C_in]
    nb, kk, c_in = tf.shape(pt)[0], pt.shape[2], pt.shape[3]
    p = pt.shape[1]
    c_out = g.shape[-1]
    g = tf.reshape(g, [nb, -1, c_out])  # [B, P, C_out], row-major positions like the patches
    if _is_depthwise(layer):
        groups, per_in, per_out = c_in, 1, c_out // c_in  # output channel c * mult + m
    else:
        groups = int(getattr(layer, "groups", 1))
        per_in, per_out = c_in // groups, c_out // groups
    a = tf.reshape(pt, [nb, -1, kk, groups, per_in])
    a = tf.reshape(tf.transpose(a, [0, 3, 1, 2, 4]), [nb, groups, -1, kk * per_in])  # [B, H, P, C]
    g4 = tf.transpose(tf.reshape(g, [nb, -1, groups, per_out]), [0, 2, 1, 3])  # [B, H, P, F]
    kernel = grouped_sq_norms(a, g4, method or choose_method(p, kk * per_in, per_out))
    bias = _sq_rows(tf.reduce_sum(g, 1)) if getattr(layer, "use_bias", False) else None
    return kernel, bias


def _is_depthwise(layer: Any) -> bool:
    return type(layer).__name__.startswith("DepthwiseConv")


# ------------------------------------------------------------------------------ layer norm, embedding


def layer_norm_sq_norms(layer: Any, inputs: tf.Tensor,
                        grad_out: tf.Tensor) -> tuple[tf.Tensor | None, tf.Tensor | None]:
    """Per-example squared norms of a LayerNormalization's ``gamma`` and ``beta`` contributions.

    Ba, Kiros & Hinton 2016 (layer normalisation): ``y = x_hat gamma + beta`` per position, so example i's
    gradients are ``sum_t x_hat_it g_it`` and ``sum_t g_it`` over the axes the parameters broadcast along.
    ``x_hat`` is the layer's own op with ``gamma = 1``, ``beta = 0`` (same epsilon and axes; the deprecated
    ``rms_scaling`` is refused by :func:`unsupported_reason`).
    """
    rank = len(inputs.shape)
    axes = [a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])]
    summed = [a for a in range(1, rank) if a not in axes]
    pshape = [inputs.shape[a] for a in axes]
    x = tf.stop_gradient(tf.convert_to_tensor(inputs))
    x_hat = keras.ops.layer_normalization(x, tf.ones(pshape, x.dtype), tf.zeros(pshape, x.dtype), layer.axis,
                                          layer.epsilon)
    g = tf.cast(grad_out, x_hat.dtype)
    gamma = _sq_rows(tf.reduce_sum(x_hat * g, summed)) if layer.gamma is not None else None
    beta = _sq_rows(tf.reduce_sum(g, summed)) if layer.beta is not None else None
    return gamma, beta


def embedding_sq_norms(ids: tf.Tensor, grad_out: tf.Tensor) -> tf.Tensor:
    """``[B]`` squared norms of an Embedding's per-example contributions ``sum_t onehot(id_t) g_t^T``.

    Rows of equal tokens add: ``||.||^2 = sum_{t,s} [id_t = id_s] g_t . g_s`` (a Gram matrix masked by token
    equality, ``B T^2 d``; never the ``vocab x d`` per-example gradient).
    """
    g = tf.cast(grad_out, tf.float64 if grad_out.dtype == tf.float64 else tf.float32)
    nb = tf.shape(g)[0]
    g = tf.reshape(g, [nb, -1, g.shape[-1]])
    ids = tf.reshape(ids, [nb, -1])
    same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), g.dtype)
    return tf.cast(tf.reduce_sum(same * tf.matmul(g, g, transpose_b=True), [1, 2]), tf.float32)


# ------------------------------------------------------------------------------------------ dispatch


def _linear_activation(layer: Any) -> bool:
    act = getattr(layer, "activation", None)
    return act is None or act is keras.activations.linear or getattr(act, "__name__", "") == "linear"


def unsupported_reason(layer: Any) -> str | None:
    """None if :func:`layer_sq_norms` is exact for ``layer``; else why not, in words."""
    kind = type(layer).__name__
    if kind in ("Dense", "EinsumDense", "Conv1D", "Conv2D", "DepthwiseConv1D", "DepthwiseConv2D"):
        if not _linear_activation(layer):
            return f"{kind} {layer.name} has a fused activation: dL/d(pre-activation) is not in the graph"
        if kind == "EinsumDense" and "..." not in layer.equation:  # with an ellipsis: checked at call time
            try:
                einsum_letters(layer.equation, len(layer.equation.split(",")[0]))
            except NotImplementedError as e:
                return str(e)
        return None
    if kind == "Embedding":
        return None if not getattr(layer, "lora_enabled", False) else f"Embedding {layer.name}: LoRA not supported"
    if kind == "LayerNormalization":
        return f"LayerNormalization {layer.name}: rms_scaling not supported" if layer.rms_scaling else None
    if kind in ("SimpleRNN", "LSTM", "GRU", "RNN", "Bidirectional"):
        return (f"{kind}: its kernels act at every time step inside one layer call (forward SimpleRNN, LSTM and "
                "GRU without dropout: from the through-time dL/dh_t; bidirectional, dropout: not implemented)")
    if not layer.trainable_weights:
        return None
    return f"{kind}: no exact per-example rule implemented"


def layer_variables(layer: Any) -> list[Any]:
    """The trainable variables :func:`layer_sq_norms` covers for ``layer``, in its order (kernel, bias)."""
    kind = type(layer).__name__
    if kind == "Embedding":
        return [layer.embeddings] if layer.embeddings.trainable else []
    if kind == "LayerNormalization":
        return [w for w in (layer.gamma, layer.beta) if w is not None and w.trainable]
    kernel = layer.kernel  # Keras 3 names the depthwise kernel `kernel` too
    bias = layer.bias if getattr(layer, "use_bias", False) or getattr(layer, "bias", None) is not None else None
    return [w for w in (kernel, bias) if w is not None and w.trainable]


def layer_sq_norms(layer: Any, inputs: tf.Tensor, grad_out: tf.Tensor,
                   method: str | None = None) -> list[tuple[Any, tf.Tensor]]:
    """``[(variable, [B] float32 ||c_i||^2)]`` for a supported layer's trainable kernel and bias.

    Args:
        layer: Dense, EinsumDense, Conv1D/2D or DepthwiseConv1D/2D with a linear activation,
            LayerNormalization or Embedding (``inputs``: the token ids).
        inputs: the tensor the layer was called on in this step.
        grad_out: dL/d(layer output) of the (replica's) batch loss.
        method: force ``gram``/``explicit`` (tests, benchmarks); None: by static cost.
    """
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(reason)
    kind = type(layer).__name__
    if kind == "Embedding":
        return [(w, embedding_sq_norms(inputs, grad_out)) for w in layer_variables(layer)]
    if kind == "LayerNormalization":
        gamma, beta = layer_norm_sq_norms(layer, inputs, grad_out)
        pairs = ((layer.gamma, gamma), (layer.beta, beta))
        return [(w, v) for w, v in pairs if w is not None and v is not None and w.trainable]
    if kind == "Dense":
        kernel, bias = einsum_sq_norms(dense_equation(len(inputs.shape)), inputs, grad_out,
                                       "Z" if layer.use_bias else None, method)
    elif kind == "EinsumDense":
        kernel, bias = einsum_sq_norms(layer.equation, inputs, grad_out, layer.bias_axes, method)
    else:
        kernel, bias = conv_sq_norms(layer, inputs, grad_out, method)
    kernel_var = layer.kernel
    bias_var = getattr(layer, "bias", None) if bias is not None else None
    return [(w, v) for w, v in ((kernel_var, kernel), (bias_var, bias)) if w is not None and w.trainable]


# ---------------------------------------------------------------------------------------- recurrent


def _forward_cell(layer: Any, kind: str) -> Any:
    """The cell of a forward ``kind`` layer without dropout (what the recurrent rules recompute)."""
    cell = getattr(layer, "cell", None)
    if type(cell).__name__ != f"{kind}Cell" or layer.go_backwards or cell.dropout or cell.recurrent_dropout:
        raise ValueError(f"{layer.name}: needs a forward {kind} without dropout")
    return cell


def simple_rnn_sq_norms(layer: Any, inputs: tf.Tensor, grad_h: tf.Tensor,
                        method: str | None = None) -> list[tuple[Any, tf.Tensor]]:
    """Per-example squared norms of a ``SimpleRNN``'s kernel, recurrent kernel and bias contributions.

    Goodfellow 2015 for each time step, summed exactly over steps: with ``z_t = W x_t + U h_{t-1} + b`` and
    ``delta_t = dL/dz_t = (dL/dh_t) phi'(z_t)``, example i's gradients are ``sum_t x_t delta_t^T``,
    ``sum_t h_{t-1} delta_t^T`` and ``sum_t delta_t``: the sequence case of :func:`einsum_sq_norms`.

    Args:
        layer: a unidirectional ``keras.layers.SimpleRNN`` (no dropout, zero initial state, forward order).
        inputs: its input sequence ``[B, T, in]`` in this step.
        grad_h: the *total* dL/dh_t ``[B, T, units]`` (through the output and all later states), as the
            through-time probe gives it (:func:`ablations.instruments._rnn_views.time_grads`: the gradient of a zero
            ``eps_t`` added to h_t inside the cell).

    The states are recomputed from ``inputs`` (one scan of this layer; the same weights the step used).
    LSTM and GRU need dL/dz of every gate: :func:`lstm_sq_norms` (also the total dL/dc_t, by a backward scan)
    and :func:`gru_sq_norms`.
    """
    cell = _forward_cell(layer, "SimpleRNN")
    x = tf.stop_gradient(tf.convert_to_tensor(inputs))
    zx = tf.einsum("bti,iu->btu", x, cell.kernel) + (cell.bias if cell.use_bias else 0.0)
    h0 = tf.zeros_like(zx[:, 0])
    states = tf.scan(lambda h, z: cell.activation(z + tf.matmul(h, cell.recurrent_kernel)),
                     tf.transpose(zx, [1, 0, 2]), initializer=h0)  # [T, B, u]: h_1 .. h_T
    h_prev = tf.concat([h0[:, None], tf.transpose(states, [1, 0, 2])[:, :-1]], axis=1)  # h_0 .. h_{T-1}
    z = zx + tf.einsum("btu,uv->btv", h_prev, cell.recurrent_kernel)
    delta = tf.cast(grad_h, z.dtype) * _derivative(cell.activation, z)
    return _cell_sq_norms(cell, x, h_prev, delta, method)


def _cell_sq_norms(cell: Any, x: tf.Tensor, h_prev: tf.Tensor, delta: tf.Tensor,
                   method: str | None) -> list[tuple[Any, tf.Tensor]]:
    """A recurrent cell's per-example squared norms from dL/dz_t ``delta`` [B, T, gates*units]: kernel
    ``sum_t x_t delta_t^T``, recurrent kernel ``sum_t h_{t-1} delta_t^T``, bias ``sum_t delta_t``."""
    eq = dense_equation(3)
    out = [(cell.kernel, einsum_sq_norms(eq, x, delta, None, method)[0]),
           (cell.recurrent_kernel, einsum_sq_norms(eq, h_prev, delta, None, method)[0])]
    if cell.use_bias:
        out.append((cell.bias, _sq_rows(tf.reduce_sum(delta, 1))))
    return [(w, v) for w, v in out if w.trainable]


def _derivative(fn: Callable[[Any], Any], z: tf.Tensor) -> tf.Tensor:
    """fn'(z) of an element-wise activation (any Keras one, without a table of derivatives)."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        y = fn(z)
    return tape.gradient(y, z)


def lstm_sq_norms(layer: Any, inputs: tf.Tensor, grad_h: tf.Tensor,
                  method: str | None = None) -> list[tuple[Any, tf.Tensor]]:
    """Per-example squared norms of an ``LSTM``'s kernel, recurrent kernel and bias contributions.

    Hochreiter & Schmidhuber 1997 (Keras' gate order i, f, g, o). The states are recomputed from ``inputs``;
    with ``c_t = f_t c_{t-1} + i_t g_t`` and ``h_t = o_t act(c_t)``, the total dL/dc_t follows from the total
    dL/dh_t ``grad_h`` by one backward scan, ``dc_t = dh_t o_t act'(c_t) + dc_{t+1} f_{t+1}``, and the gates'
    pre-activation gradients are ``dz_i = dc_t g_t i'``, ``dz_f = dc_t c_{t-1} f'``, ``dz_g = dc_t i_t g'``,
    ``dz_o = dh_t act(c_t) o'``; example i's gradients are then ``sum_t x_t dz_t^T``, ``sum_t h_{t-1} dz_t^T``
    and ``sum_t dz_t`` (the sequence case of :func:`einsum_sq_norms`, as for SimpleRNN).

    Args:
        layer: a unidirectional ``keras.layers.LSTM`` (no dropout, zero initial state, forward order).
        inputs: its input sequence ``[B, T, in]`` in this step.
        grad_h: the total dL/dh_t ``[B, T, units]`` (the through-time view's eps gradients).
    """
    cell = _forward_cell(layer, "LSTM")
    n, act, gate = cell.units, cell.activation, cell.recurrent_activation
    x = tf.stop_gradient(tf.convert_to_tensor(inputs))
    zx = tf.einsum("bti,iu->btu", x, cell.kernel) + (cell.bias if cell.use_bias else 0.0)

    def step(carry: tuple[Any, Any], z: Any) -> tuple[Any, Any]:
        h, c = carry
        z = z + tf.matmul(h, cell.recurrent_kernel)
        c = gate(z[:, n:2 * n]) * c + gate(z[:, :n]) * act(z[:, 2 * n:3 * n])
        return gate(z[:, 3 * n:]) * act(c), c

    zeros = tf.zeros_like(zx[:, 0, :n])
    hs, cs = tf.scan(step, tf.transpose(zx, [1, 0, 2]), initializer=(zeros, zeros))  # [T, B, n]: h_1.., c_1..
    hs, cs = tf.transpose(hs, [1, 0, 2]), tf.transpose(cs, [1, 0, 2])
    h_prev = tf.concat([zeros[:, None], hs[:, :-1]], axis=1)
    c_prev = tf.concat([zeros[:, None], cs[:, :-1]], axis=1)
    z = zx + tf.einsum("btu,uv->btv", h_prev, cell.recurrent_kernel)
    zi, zf, zg, zo = tf.split(z, 4, axis=-1)
    i, f, g, o = gate(zi), gate(zf), act(zg), gate(zo)
    dh = tf.cast(grad_h, z.dtype)
    carry = dh * o * _derivative(act, cs)  # the direct part of dc_t, through h_t
    f_next = tf.concat([f[:, 1:], tf.zeros_like(f[:, :1])], axis=1)
    dc = tf.transpose(tf.scan(lambda acc, e: e[0] + acc * e[1],
                              (tf.transpose(carry, [1, 0, 2]), tf.transpose(f_next, [1, 0, 2])),
                              initializer=zeros, reverse=True), [1, 0, 2])
    delta = tf.concat([dc * g * _derivative(gate, zi), dc * c_prev * _derivative(gate, zf),
                       dc * i * _derivative(act, zg), dh * act(cs) * _derivative(gate, zo)], axis=-1)
    return _cell_sq_norms(cell, x, h_prev, delta, method)


def gru_sq_norms(layer: Any, inputs: tf.Tensor, grad_h: tf.Tensor,
                 method: str | None = None) -> list[tuple[Any, tf.Tensor]]:
    """Per-example squared norms of a ``GRU``'s kernel, recurrent kernel and bias contributions.

    Cho et al. 2014 (Keras' gate order z, r, h; ``reset_after`` either way). The states are recomputed from
    ``inputs``; ``h_t = z_t h_{t-1} + (1 - z_t) hh_t`` with ``hh_t = act(x_h + r_t (h_{t-1} U_h + b_rh))``
    (``reset_after``) or ``act(x_h + (r_t h_{t-1}) U_h)``. The gates act on h_t alone, so the total dL/dh_t
    ``grad_h`` gives every gate's pre-activation gradient at step t without a backward scan:
    ``da_z = dh (h_{t-1} - hh) z'``, ``da_h = dh (1 - z) act'``, and ``da_r`` from the gradient of the reset
    product. Example i's gradients are then sums over t of outer products, as for SimpleRNN.

    Args:
        layer: a unidirectional ``keras.layers.GRU`` (no dropout, zero initial state, forward order).
        inputs: its input sequence ``[B, T, in]`` in this step.
        grad_h: the total dL/dh_t ``[B, T, units]`` (the through-time view's eps gradients).
    """
    cell = _forward_cell(layer, "GRU")
    n, act, gate, after = cell.units, cell.activation, cell.recurrent_activation, cell.reset_after
    x = tf.stop_gradient(tf.convert_to_tensor(inputs))
    zx = tf.einsum("bti,iu->btu", x, cell.kernel) + _gru_biases(cell)[0]

    def step(h: Any, zx_t: Any) -> Any:
        g = _gru_gates(cell, h, zx_t)
        return g["z"] * h + (1 - g["z"]) * g["hh"]

    zeros = tf.zeros_like(zx[:, 0, :n])
    hs = tf.transpose(tf.scan(step, tf.transpose(zx, [1, 0, 2]), initializer=zeros), [1, 0, 2])
    h_prev = tf.concat([zeros[:, None], hs[:, :-1]], axis=1)  # h_0 .. h_{T-1}
    g = _gru_gates(cell, h_prev, zx)
    dh = tf.cast(grad_h, zx.dtype)
    da_z = dh * (h_prev - g["hh"]) * _derivative(gate, g["a_z"])
    da_h = dh * (1 - g["z"]) * _derivative(act, g["a_h"])
    # dL/d(r * reset) = da_h (reset_after) or da_h U_h^T (the product r h_{t-1} enters through U_h)
    d_product = da_h if after else tf.einsum("btv,uv->btu", da_h, cell.recurrent_kernel[:, 2 * n:])
    da_r = d_product * g["reset"] * _derivative(gate, g["a_r"])
    eq = dense_equation(3)
    delta_x = tf.concat([da_z, da_r, da_h], -1)
    kernel = einsum_sq_norms(eq, x, delta_x, None, method)[0]
    if after:  # one product h_{t-1} U for all three gates, r applied after it
        delta_h = tf.concat([da_z, da_r, g["r"] * da_h], -1)
        recurrent = einsum_sq_norms(eq, h_prev, delta_h, None, method)[0]
    else:  # U_zr reads h_{t-1}, U_h reads r h_{t-1}: disjoint column blocks, their squared norms add
        recurrent = (einsum_sq_norms(eq, h_prev, tf.concat([da_z, da_r], -1), None, method)[0]
                     + einsum_sq_norms(eq, g["r"] * h_prev, da_h, None, method)[0])
    out = [(cell.kernel, kernel), (cell.recurrent_kernel, recurrent)]
    if cell.use_bias:  # reset_after: rows (input bias, recurrent bias) of one [2, 3 units] variable
        bias = _sq_rows(tf.reduce_sum(delta_x, 1))
        out.append((cell.bias, bias + _sq_rows(tf.reduce_sum(delta_h, 1)) if after else bias))
    return [(w, v) for w, v in out if w.trainable]


def _gru_biases(cell: Any) -> tuple[Any, Any]:
    """(input bias, recurrent bias) of a GRUCell: rows of one [2, 3 units] variable with ``reset_after``."""
    if not cell.use_bias:
        return 0.0, 0.0
    return (cell.bias[0], cell.bias[1]) if cell.reset_after else (cell.bias, 0.0)


def _gru_gates(cell: Any, h: Any, zx: Any) -> dict[str, Any]:
    """Pre-activations ``a_*``, gates, candidate ``hh`` and what the reset gate multiplies, of one GRU step
    (``h`` [B, units], ``zx`` [B, 3 units]) or of all steps at once ([B, T, ...]), as Keras' GRUCell."""
    n, gate, after = cell.units, cell.recurrent_activation, cell.reset_after
    u = cell.recurrent_kernel
    inner = tf.matmul(h, u) + _gru_biases(cell)[1] if after else tf.matmul(h, u[:, :2 * n])
    g = {"a_z": zx[..., :n] + inner[..., :n], "a_r": zx[..., n:2 * n] + inner[..., n:2 * n]}
    g["z"], g["r"] = gate(g["a_z"]), gate(g["a_r"])
    g["reset"] = inner[..., 2 * n:] if after else h
    g["a_h"] = zx[..., 2 * n:] + (g["r"] * g["reset"] if after else tf.matmul(g["r"] * h, u[:, 2 * n:]))
    g["hh"] = cell.activation(g["a_h"])
    return g


RECURRENT_RULES = {"SimpleRNNCell": simple_rnn_sq_norms, "LSTMCell": lstm_sq_norms, "GRUCell": gru_sq_norms}


# ------------------------------------------------------------------------------------- sub-layer taps


@contextlib.contextmanager
def record_io(layers: Sequence[Any]) -> Iterator[dict[int, list[tuple[Any, Any]]]]:
    """Records ``(inputs, output)`` of every call of ``layers`` made inside the block, by ``id(layer)``.

    For sub-layers that a functional tap model cannot expose (MultiHeadAttention's query/key/value/output
    EinsumDense): the recorded output is the tensor the rest of the forward pass used, so a tape around the
    block gives dL/d(output) for it. Works eagerly and while a ``tf.function`` traces (the wrapper runs at
    trace time); each layer's ``call`` is restored on exit.
    """
    calls: dict[int, list[tuple[Any, Any]]] = {id(l): [] for l in layers}
    saved = []
    for layer in layers:
        original = layer.call

        def call(*args: Any, _orig=original, _id=id(layer), **kwargs: Any) -> Any:
            out = _orig(*args, **kwargs)
            calls[_id].append((args[0], out))
            return out

        saved.append((layer, "call" in layer.__dict__, layer.__dict__.get("call")))
        object.__setattr__(layer, "call", call)
    try:
        yield calls
    finally:
        for layer, had, value in saved:
            if had:
                object.__setattr__(layer, "call", value)
            else:
                object.__delattr__(layer, "call")


def attention_projections(layer: Any) -> list[Any]:
    """The EinsumDense projections of a ``keras.layers.MultiHeadAttention`` (query, key, value, output)."""
    return [getattr(layer, n) for n in ("query_dense", "key_dense", "value_dense", "output_dense")
            if getattr(layer, n, None) is not None]


def plan(model: keras.Model) -> dict[str, Any]:
    """What :func:`layer_sq_norms` covers in ``model``, found statically (build once, outside the step).

    Returns ``layers`` (functional layers to tap: input and dL/d output), ``sublayers`` (MultiHeadAttention
    projections, to record with :func:`record_io` around the forward pass), ``rnn`` (recurrent layers, from
    the through-time dL/dh_t), ``variables`` (every covered variable, in that order) and ``unsupported``
    (``{layer name: reason}`` for layers with trainable weights that are not covered).
    """
    layers, subs, rnn, unsupported = [], [], [], {}
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        if isinstance(layer, keras.layers.MultiHeadAttention):
            subs.extend(attention_projections(layer))
            continue
        if isinstance(layer, (keras.layers.SimpleRNN, keras.layers.LSTM, keras.layers.GRU)) and not (
                layer.go_backwards or layer.cell.dropout or layer.cell.recurrent_dropout):
            rnn.append(layer)
            continue
        reason = unsupported_reason(layer)
        if reason is None:
            layers.append(layer)
        else:
            unsupported[layer.name] = reason
    variables = [w for l in layers + subs for w in layer_variables(l)] + \
                [w for l in rnn for w in l.cell.trainable_weights]
    return dict(layers=layers, sublayers=subs, rnn=rnn, variables=variables, unsupported=unsupported)


# ------------------------------------------------------------------------------------------ statistics


def group_columns(sq: Sequence[tf.Tensor], groups: Sequence[Sequence[int]]) -> tf.Tensor:
    """``[B, K]``: per example, the sum of the ``[B]`` squared norms ``sq`` over each group (a block's tensors).

    The squared norm of a block's per-example gradient is the sum over its tensors.
    """
    return tf.stack([tf.add_n([sq[i] for i in idx]) for idx in groups], axis=1)


def norm_sums(sq: tf.Tensor) -> tf.Tensor:
    """``[3, K]`` float32 partial sums over this replica's examples of ``||c_i||``, ``||c_i||^2`` and 1.

    Args:
        sq: ``[B, K]`` per-example squared contribution norms (K groups: tensors or blocks).

    Additive over examples, hence over replicas: all-reduce (SUM) them, then :func:`noise_statistics`.
    """
    sq = tf.cast(sq, tf.float32)
    return tf.stack([tf.reduce_sum(tf.sqrt(sq), 0), tf.reduce_sum(sq, 0),
                     tf.fill([tf.shape(sq)[1]], tf.cast(tf.shape(sq)[0], tf.float32))])


def noise_statistics(sums: tf.Tensor, batch_grad_sq: tf.Tensor, examples_per_loss: tf.Tensor | None = None
                     ) -> dict[str, tf.Tensor]:
    """Per-example norm spread, unbiased tr(Sigma) and |G|^2, the noise scale B_simple and the batch SNR.

    McCandlish et al. 2018, "An empirical model of large-batch training" (B_simple, App. A.1).

    Let ``g_i = B c_i`` be the gradients of the B examples' losses (i.i.d., mean G, covariance Sigma), ``S =
    sum_i ||g_i||^2`` and ``G_B = (1/B) sum_i g_i`` the batch gradient. From ``E||g_i||^2 = |G|^2 + tr Sigma``
    and ``E||G_B||^2 = |G|^2 + tr Sigma / B``:

    * ``trace_sigma = (S - B ||G_B||^2) / (B - 1)``, unbiased for tr(Sigma) (the trace of the sample
      covariance; McCandlish's S estimator with B_small = 1, B_big = B);
    * ``grad_sq = ||G_B||^2 - trace_sigma / B = (B ||G_B||^2 - S / B) / (B - 1)``, unbiased for |G|^2;
    * ``b_simple = trace_sigma / grad_sq``: a ratio of unbiased estimates (not itself unbiased: average the
      two over steps before dividing, as McCandlish et al. do, for a low-noise figure);
    * ``snr = grad_sq / (trace_sigma / B) = B / b_simple``: the signal-to-noise ratio of the mini-batch
      gradient, |G|^2 over its expected squared error E||G_B - G||^2 = tr Sigma / B (the quantity Byrd et al.
      2012, "Sample size selection in optimization methods for machine learning", bound in their norm test;
      > 1: the batch gradient is signal-dominated);
    * ``mean_norm``, ``std_norm``: mean and sample standard deviation (divisor B - 1) of ``||g_i||``.

    Needs B >= 2 (NaN otherwise).

    Args:
        sums: ``[3, K]`` all-reduced :func:`norm_sums`.
        batch_grad_sq: ``[K]`` ``||G_B||^2`` of the global batch gradient over the same tensors per group.
        examples_per_loss: the factor from contributions to per-example gradients; default the global
            batch size ``sums[2]`` (right for Keras' mean reduction, where replica losses are divided by
            the replica count).

    Returns:
        ``{name: [K] float32}`` for :data:`NOISE_STATS`.
    """
    s_norm, s_sq, count = sums[0], sums[1], sums[2]
    factor = count if examples_per_loss is None else tf.cast(examples_per_loss, tf.float32)
    g2 = tf.cast(batch_grad_sq, tf.float32)
    s = s_sq * tf.square(factor)  # sum_i ||g_i||^2
    mean_norm = s_norm * factor / count
    nan = tf.fill(tf.shape(count), float("nan"))
    dof = tf.where(count > 1, count - 1, nan)
    var_norm = (s - count * tf.square(mean_norm)) / dof
    trace = (s - count * g2) / dof
    grad_sq = g2 - trace / count
    return dict(mean_norm=mean_norm, std_norm=tf.sqrt(tf.maximum(var_norm, 0.0)), trace_sigma=trace,
                grad_sq=grad_sq, b_simple=trace / grad_sq, snr=count * grad_sq / trace)


def numpy_noise_statistics(per_example: np.ndarray) -> dict[str, float]:
    """Reference of :func:`noise_statistics` from explicit per-example gradients ``[B, n]`` (float64, NumPy)."""
    g = np.asarray(per_example, np.float64)
    b = g.shape[0]
    mean = g.mean(0)
    trace = float(np.sum((g - mean) ** 2) / (b - 1))  # trace of the sample covariance, column by column
    grad_sq = float(mean @ mean) - trace / b
    norms = np.linalg.norm(g, axis=1)
    return dict(mean_norm=float(norms.mean()), std_norm=float(norms.std(ddof=1)), trace_sigma=trace,
                grad_sq=grad_sq, b_simple=trace / grad_sq, snr=b * grad_sq / trace)


# ------------------------------------------------------------------------------------------ the instrument

ALL = "all"  # the block name (depth -1) of the row over every covered tensor of the model


@dataclasses.dataclass
class Coverage:
    """What the ``per_example`` instrument covers in one model (static, found once outside the step).

    Attributes:
        layers: layers of the model's graph tapped at their input and output (:func:`layer_sq_norms`).
        attention: ``(MultiHeadAttention, its graph node)``: projections read from a recomputation of the
            layer (:func:`attention_sq_norms`).
        rnn: recurrent layers, from their tapped input and the through-time dL/dh_t (:data:`RECURRENT_RULES`).
        variables: every covered variable, in the order of ``rows``; ``rows``: their rows in the spec's params.
        groups: ``(block, depth, [positions in variables], coverage)``: a row per block with a covered kernel,
            then :data:`ALL`.
        unsupported: layer name -> why its weights are not covered.
    """

    layers: list
    attention: list
    variables: list
    rows: list
    groups: list
    unsupported: dict
    rnn: list = dataclasses.field(default_factory=list)


def coupling_reason(net: Any) -> str | None:
    """Why no per-example gradients can be read from ``net``'s graph at all, or None."""
    for layer in net.layers:
        if compat.functional_graph(layer) is not None:
            return (f"{layer.name} is a nested model: its layers' inputs and outputs are not tensors of the "
                    "top-level graph the taps are built from")
        if isinstance(layer, keras.layers.BatchNormalization):
            return (f"{layer.name}: BatchNormalization in training mode couples the examples of a batch (no "
                    "per-example gradient exists); use norm: layer, group or none")
    return None


def noise_groups(params: Any, blocks: Any, rows: list[int]) -> list[tuple[str, int, list[int], float]]:
    """The statistic rows: each block's covered kernels (``role == block``, param ``...kernel``), then every
    covered tensor (:data:`ALL`); coverage is the covered fraction of the kernel (or all trainable) entries."""
    pos = {r: k for k, r in enumerate(rows)}
    size = params["size"].to_numpy(float)
    role, depth, param = params["role"].tolist(), params["depth"].tolist(), [str(p) for p in params["param"]]
    out = []
    for d, name in zip(blocks["depth"].tolist(), blocks["block"].tolist()):
        kernels = [i for i in range(len(params))
                   if role[i] == "block" and depth[i] == d and param[i].endswith("kernel")]
        covered = [i for i in kernels if i in pos]
        if covered:
            out.append((str(name), int(d), [pos[i] for i in covered], float(size[covered].sum() / size[kernels].sum())))
    if rows:
        out.append((ALL, -1, list(range(len(rows))), float(size[rows].sum() / size.sum())))
    return out


def coverage(spec: Any) -> Coverage | str:
    """The :class:`Coverage` of a probed model, or why it has none."""
    net = spec.net
    if not spec.graph:
        return "the model has no functional graph (subclassed)"
    why = coupling_reason(net)
    if why:
        return why
    p = plan(net)
    unsupported = dict(p["unsupported"])
    rnn = list(p["rnn"])
    if rnn:
        from ablations.instruments._rnn_views import chain_problem

        problem = chain_problem(net)
        if problem:
            unsupported.update({l.name: f"SimpleRNN without the through-time view: {problem}" for l in rnn})
            rnn = []
    nodes = {id(n.operation): n for n in compat.graph_nodes(compat.functional_graph(net)) if n.operation is not None}
    attention = []
    for layer in net.layers:
        if not isinstance(layer, keras.layers.MultiHeadAttention):
            continue
        if layer.dropout:
            unsupported[layer.name] = ("MultiHeadAttention with dropout: its projections come from a recomputation "
                                       "of the layer, which would draw another dropout mask")
        else:
            attention.append((layer, nodes[id(layer)]))
    variables = [w for l in p["layers"] for w in layer_variables(l)] + \
                [w for l, _ in attention for s in attention_projections(l) for w in layer_variables(s)] + \
                [w for l in rnn for w in l.cell.trainable_weights]
    row_of = {id(v): i for i, v in enumerate(net.trainable_variables)}
    rows = [row_of[id(v)] for v in variables]
    return Coverage(p["layers"], attention, variables, rows, noise_groups(spec.params, spec.blocks, rows), unsupported,
                    rnn)


def rnn_sq_norms(view: Any, layers: Sequence[Any], inputs: Sequence[Any], ctx: StepContext) -> list[tuple[Any, Any]]:
    """Per-example squared norms of recurrent kernels: the total dL/dh_t of every layer from the weight-sharing
    through-time view (:mod:`ablations.instruments._rnn_views`; the training backward pass when the probe
    trained the step through it, else one more pass), then the cell's rule in :data:`RECURRENT_RULES`."""
    from ablations.instruments._rnn_views import step_time_grads

    dh = dict(zip(view.names, step_time_grads(view, ctx)))
    return [pair for layer, a in zip(layers, inputs)
            for pair in RECURRENT_RULES[type(layer.cell).__name__](layer, a, dh[layer.name])]


def attention_sq_norms(layer: Any, node: Any, inputs: Sequence[Any], grad_out: Any) -> list[tuple[Any, tf.Tensor]]:
    """Per-example squared norms of a MultiHeadAttention's projection kernels and biases.

    The projections' inputs and outputs live inside the layer, out of a functional tap's reach: the layer is
    called again on its tapped inputs with its recorded call arguments (same weights; no dropout, refused by
    :func:`coverage`), the projections' calls are recorded (:func:`record_io`), and the tapped dL/d(output)
    is back-propagated through that recomputation (a vector-Jacobian product: exact, one more attention
    forward and backward pass).
    """
    args, kwargs = compat.node_arguments(node, {id(kt): t for kt, t in zip(node.input_tensors, inputs)})
    subs = attention_projections(layer)
    with tf.GradientTape() as tape, record_io(subs) as calls:
        out = layer(*args, **kwargs)
    sub_in = [calls[id(s)][-1][0] for s in subs]
    sub_out = [calls[id(s)][-1][1] for s in subs]
    grads = tape.gradient(out, sub_out, output_gradients=tf.cast(grad_out, out.dtype))
    return [pair for s, a, g in zip(subs, sub_in, grads) for pair in layer_sq_norms(s, a, g)]


class PerExample(Instrument):
    """Per block, from exact per-example gradient norms: their spread, the gradient noise scale and the SNR.

    Rows: one per block with a covered kernel (its kernels: Dense, EinsumDense, Conv1D/2D, depthwise convs,
    MultiHeadAttention's query/key/value/output projections, recurrent kernels and biases), and one,
    block ``all`` (depth -1), over every covered tensor of the model (kernels, biases, LayerNorm, Embedding;
    stem and head included): McCandlish's critical batch size of the whole net. Not covered (their rows or
    entries are absent, ``coverage`` says how much is): layers with a fused activation (a highway gate), bidirectional RNNs, BatchNorm and
    other layers without an exact rule (:func:`unsupported_reason`); models with BatchNormalization (it
    couples the examples) or nested models get no table, with a note. ``g_i`` is the gradient of example
    i's own loss term, from the step's global batch (all replicas; B is the global batch size).
    """

    name = "per_example"
    table = "per_example"
    order = 65
    default = False
    Opts = EveryOptions
    needs = frozenset({"grads"})
    grad_taps = ("per_example_out",)
    columns = (
        Column("tensors", "trainable tensors the row covers (a block: its covered kernels; all: every covered tensor)"),
        Column("coverage", "covered fraction of the row's entries (a block: of its kernel entries; all: of the "
                           "model's trainable entries)"),
        Column("mean_norm", "mean over the batch of ||g_i||, the norm of example i's own loss gradient over the "
                            "row's tensors", "per_example/mean_norm/{block}"),
        Column("std_norm", "standard deviation of ||g_i|| over the batch (divisor B - 1)"),
        Column("trace_sigma", "tr(Sigma), unbiased: (sum_i ||g_i||^2 - B ||G_B||^2) / (B - 1), G_B the batch gradient"),
        Column("grad_sq", "|G|^2, unbiased: ||G_B||^2 - tr(Sigma) / B"),
        Column("b_simple", "gradient noise scale tr(Sigma) / |G|^2 in examples (McCandlish et al. 2018); a ratio of "
                           "per-step estimates: noisy, negative when the |G|^2 estimate is",
               "per_example/b_simple/{block}"),
        Column("snr", "B |G|^2 / tr(Sigma) = B / b_simple: signal-to-noise ratio of the mini-batch gradient",
               "per_example/snr/{block}"),
    )

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._coverage: Coverage | str | None = None
        self._view: Any = None

    @property
    def coverage(self) -> Coverage | str:
        if self._coverage is None:
            self._coverage = coverage(self.spec)
        return self._coverage

    def applies(self) -> bool:
        c = self.coverage
        if isinstance(c, str) or not c.groups:
            why = c if isinstance(c, str) else "no layer has an exact rule"
            self.spec.notes.append(f"no per-example statistics (per_example): {why}")
            return False
        if c.unsupported:
            names = sorted(c.unsupported)
            more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
            self.spec.notes.append("per_example does not cover: " + "; ".join(c.unsupported[n] for n in names[:3])
                                   + more)
        return True

    def forward_view(self) -> Any:
        if not self.coverage.rnn:
            return None
        from ablations.instruments._rnn_views import training_view

        return training_view(self.spec.net)  # the SimpleRNN rule needs the total dL/dh_t

    def taps(self) -> dict[str, list[Any]]:
        c = self.coverage
        ins = [l.input for l in c.layers] + [t for _, node in c.attention for t in node.input_tensors]
        outs = [l.output for l in c.layers] + [l.output for l, _ in c.attention]
        return {"per_example_in": ins, "per_example_out": outs, "per_example_rnn_in": [l.input for l in c.rnn]}

    def shape(self) -> tuple[int, ...]:
        return (len(self.coverage.groups), len(NOISE_STATS))

    def compute(self, ctx: StepContext, red: Reducer) -> Finish:
        c = self.coverage
        ins, outs = ctx.taps["per_example_in"], ctx.tap_grads["per_example_out"]
        got = {}
        for layer, a, g in zip(c.layers, ins, outs):
            got.update({id(v): sq for v, sq in layer_sq_norms(layer, a, g)})
        k = len(c.layers)
        for j, (layer, node) in enumerate(c.attention):
            n = len(node.input_tensors)
            pairs = attention_sq_norms(layer, node, ins[k:k + n], outs[len(c.layers) + j])
            got.update({id(v): sq for v, sq in pairs})
            k += n
        if c.rnn:
            if self._view is None:
                from ablations.instruments._rnn_views import shared_time_view

                self._view = shared_time_view(self.spec.net)  # shares the cells' variables; built once
            pairs = rnn_sq_norms(self._view, c.rnn, ctx.taps["per_example_rnn_in"], ctx)
            got.update({id(v): sq for v, sq in pairs})
        cols = group_columns([got[id(v)] for v in c.variables], [idx for _, _, idx, _ in c.groups])
        local = norm_sums(cols)
        ctx.before_update.append(local)  # done before the update: the recomputed attention reads the weights
        sums = red.sums(local)  # additive over replicas: one all-reduce with the step's other sums
        member = np.zeros([len(c.groups), len(c.rows)], np.float32)
        for i, (_, _, idx, _) in enumerate(c.groups):
            member[i, idx] = 1.0
        # ||G_B||^2 per row from the global gradients (identical on every replica).
        g2 = tf.linalg.matvec(tf.constant(member), sq_sums([ctx.global_grads[r] for r in c.rows]))

        def finish(r: Any) -> Any:
            stats = noise_statistics(r(sums), g2)
            return tf.stack([stats[name] for name in NOISE_STATS], axis=1)

        return finish

    def frame(self, steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        groups = self.coverage.groups
        n, k = len(steps), len(groups)
        df = pd.DataFrame({
            "step": np.repeat(steps, k), "epoch": np.repeat(epochs, k),
            "depth": np.tile([g[1] for g in groups], n), "block": np.tile([g[0] for g in groups], n),
            "tensors": np.tile([len(g[2]) for g in groups], n), "coverage": np.tile([g[3] for g in groups], n)})
        for j, name in enumerate(NOISE_STATS):
            df[name] = values[:, :, j].reshape(-1)
        return df
