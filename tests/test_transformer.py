"""The transformer encoder: shapes, gradients, naming, ReZero identity, positions, Pre-LN vs Post-LN at init."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import zoo
from ablations import measure
from zoo.layers.positions import sinusoidal_table
from zoo.transformer import SUBLAYER_KIND

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _build(seed=0, shape=(10, 3), n_out=4, **kw) -> keras.Model:
    keras.utils.set_random_seed(seed)
    kw = {"depth": 2, "d_model": 16, "heads": 2, **kw}
    return zoo.build("transformer", input_shape=shape, num_outputs=n_out, **kw)


def _x(shape, n=4, seed=0, vocab=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (n, *shape)) if len(shape) == 1 else rng.normal(size=(n, *shape)).astype("float32")


@pytest.mark.parametrize("norm_position", ["pre", "post", "none"])
@pytest.mark.parametrize("residual", ["standard", "rezero"])
def test_shapes_and_gradients(norm_position, residual):
    m = _build(norm_position=norm_position, residual=residual, dropout=0.1)
    x = _x((10, 3))
    with tf.GradientTape() as tape:
        out = m(x, training=True)
        loss = SCCE(np.arange(4) % 4, out)
    assert tuple(out.shape) == (4, 4)
    grads = dict(zip([v.path for v in m.trainable_variables], tape.gradient(loss, m.trainable_variables)))
    assert all(g is not None for g in grads.values())
    nonzero = {p for p, g in grads.items() if float(tf.norm(g)) > 0}
    if residual == "standard":
        assert nonzero == set(grads)
    else:  # ReZero at init: alpha = 0 blocks every branch, so its weights get no gradient but the alphas do
        branch = {p for p in grads if p.startswith("block_") and p.split("/")[0].endswith(("_attn", "_linear", "_linear2"))}
        assert branch and not branch & nonzero
        assert {p for p in grads if "rezero" in p} <= nonzero


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "none"])
def test_token_input_and_per_token_head(positions):
    m = _build(shape=(12,), n_out=10, output="sequence", positions=positions)
    assert tuple(m(_x((12,), vocab=10)).shape) == (4, 12, 10)
    assert ("stem_positions" in [l.name for l in m.layers]) == (positions != "none")


def test_layer_names_and_sublayer_kinds():
    m = _build(depth=3, norm_position="pre")
    blocks = zoo.blocks(m)
    assert [b.index for b in blocks] == [0, 1, 2]
    for b in blocks:
        assert isinstance(b.layers["attn"], keras.layers.MultiHeadAttention)
        assert isinstance(b.linear, keras.layers.Dense) and b.linear.units == 64  # ffn_width = 4 * d_model
        assert set(b.layers) == {"attn_in", "norm1", "attn", "add1", "ffn_in", "norm2", "linear", "act",
                                 "linear2", "add2"}
        assert set(b.layers) <= set(SUBLAYER_KIND)
    # Post-LN normalises after each residual sum: the FFN input of layer 0 is norm1's output.
    post = _build(norm_position="post")
    assert post.get_layer("block_000_ffn_in").input is post.get_layer("block_000_norm1").output
    assert "head_norm" not in [l.name for l in post.layers]


def test_sinusoidal_table_closed_form():
    pe = sinusoidal_table(50, 16)
    for t, k in [(0, 0), (3, 0), (7, 5), (49, 14), (20, 15)]:
        angle = t / 10000 ** (2 * (k // 2) / 16)
        assert pe[t, k] == pytest.approx(np.sin(angle) if k % 2 == 0 else np.cos(angle))
    m = _build(positions="sinusoidal", shape=(10, 3))
    sub = keras.Model(m.input, [m.get_layer("stem_linear").output, m.get_layer("stem_positions").output])
    a, b = sub(_x((10, 3)))
    np.testing.assert_allclose(b - a, np.broadcast_to(sinusoidal_table(10, 16), a.shape), atol=1e-6)


def test_rezero_is_identity_at_init_and_sublayer_input_gradients_are_equal():
    m = _build(depth=4, residual="rezero", norm_position="none", dtype="float64")
    ins = [m.get_layer(zoo.block_name(i, part, 4)).output for i in range(4) for part in ("attn_in", "ffn_in")]
    tap = keras.Model(m.input, [m.output, m.get_layer("stem_positions").output, *ins])
    x = _x((10, 3)).astype("float64")
    with tf.GradientTape() as tape:
        out, stem, *taps = tap(x)
        loss = SCCE(np.arange(4) % 4, out)
    for t in taps:  # every block is the identity: each sub-layer sees the embedded input
        np.testing.assert_array_equal(t, stem)
    grads = tape.gradient(loss, taps)
    for g in grads[1:]:  # ... and dL/d(sub-layer input) is the same at every depth
        np.testing.assert_allclose(g, grads[0], rtol=1e-12)


def _ffn_profile(norm_position: str, seed: int) -> np.ndarray:
    m = _build(seed=seed, shape=(16, 4), n_out=5, depth=6, d_model=32, heads=4, norm_position=norm_position)
    rng = np.random.default_rng(seed)
    df = measure(m, (rng.normal(size=(32, 16, 4)).astype("float32"), rng.integers(0, 5, 32)), SCCE)
    k = df[(df.role == "block") & (df.param == "kernel") & (df.layer == df.block + "_linear")].sort_values("depth")
    assert list(k.depth) == list(range(6))
    return k.grad_norm.to_numpy()


def test_post_ln_ffn_gradient_grows_with_layer_index_relative_to_pre_ln():
    # Xiong et al. 2020: at init the FFN weight gradient grows with the layer index in Post-LN and does not in
    # Pre-LN. Measured here (depth 6, d_model 32): last/first ~1.6 for Post-LN, ~0.4-0.7 for Pre-LN.
    post = np.mean([p[-1] / p[0] for p in (_ffn_profile("post", s) for s in range(2))])
    pre = np.mean([p[-1] / p[0] for p in (_ffn_profile("pre", s) for s in range(2))])
    assert post > 1.2 and pre < 1.0 and post > 1.5 * pre


@pytest.mark.parametrize("kw,match", [
    ({"norm_position": "middle"}, "norm_position must be one of pre, post, none"),
    ({"residual": "highway"}, "residual must be one of standard, rezero"),
    ({"positions": "rotary"}, "positions must be one of"),
    ({"output": "last"}, "output must be one of mean, sequence"),
    ({"d_model": 10, "heads": 4}, "divisible"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        _build(**kw)


def test_keras_round_trip(tmp_path):
    m = _build(residual="rezero", positions="learned", norm_position="pre")
    for layer in m.layers:  # move the alphas off 0 so the branches count
        if "rezero" in layer.name:
            layer.alpha.assign(0.3)
    path = os.path.join(tmp_path, "t.keras")
    m.save(path)
    x = _x((10, 3))
    np.testing.assert_allclose(keras.saving.load_model(path)(x), m(x), rtol=1e-6)
