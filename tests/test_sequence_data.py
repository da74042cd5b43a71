"""Sequence datasets: the adding-problem and copy-memory TFDS builders, and the image -> sequence transform."""

from __future__ import annotations

import math

import numpy as np
import pytest

import ablations.data as data
from ablations.config import ConfigError, DataConfig, parse_experiment


def _split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    rows = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    return np.stack([r["x"] for r in rows]), np.stack([r["y"] for r in rows])


@pytest.fixture(scope="module")
def adding(tfds_dir):
    b = data.builder("adding_problem/T50", tfds_dir, download=False)
    return b, _split(b, "train"), _split(b, "test")


@pytest.fixture(scope="module")
def copy10(tfds_dir):
    b = data.builder("copy_memory/T10", tfds_dir, download=False)
    return b, _split(b, "train")


def test_adding_problem_distribution_and_targets(adding):
    b, (x, y), (xt, yt) = adding
    assert b.info.splits["train"].num_examples == 10_000 and b.info.splits["test"].num_examples == 1_000
    assert x.shape == (10_000, 50, 2) and y.shape == (10_000, 1) and x.dtype == np.float32
    values, markers = x[..., 0], x[..., 1]
    assert values.min() >= 0 and values.max() < 1 and abs(values.mean() - 0.5) < 0.01
    assert set(np.unique(markers)) == {0.0, 1.0}
    # Exactly two markers: one in each half; the target is the sum of the marked values.
    assert (markers[:, :25].sum(1) == 1).all() and (markers[:, 25:].sum(1) == 1).all()
    np.testing.assert_allclose(y[:, 0], (values * markers).sum(1), rtol=1e-6)
    # Train and test differ (different seeds); no test sequence appears in train.
    assert not {r.tobytes() for r in xt} & {r.tobytes() for r in x}


def test_adding_problem_baseline_in_metadata_matches_data(adding):
    b, (x, y), _ = adding
    meta = b.info.metadata
    assert meta["baseline_loss"] == pytest.approx(1 / 6) and meta["baseline_metric"] == "mse" and meta["T"] == 50
    # Predicting the mean target: Var(u1 + u2) = 1/6; standard error of the estimate ~0.002 at n = 10,000.
    assert np.mean((y - y.mean()) ** 2) == pytest.approx(1 / 6, abs=0.01)
    assert np.mean((y - 1.0) ** 2) == pytest.approx(meta["baseline_loss"], abs=0.01)


def test_generators_are_deterministic():
    from ablations.data import adding, copy_memory

    for mod in (adding, copy_memory):
        a, b, c = mod.generate(30, 50, seed=0), mod.generate(30, 50, seed=0), mod.generate(30, 50, seed=1)
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.array_equal(a[0], c[0])


def test_copy_memory_layout(copy10):
    b, (x, y) = copy10
    T, length = 10, 30
    assert x.shape == (10_000, length) and y.shape == (10_000, length)
    assert set(np.unique(x[:, :10])) == set(range(1, 9))  # the 10 symbols: uniform over 1..8
    counts = np.bincount(x[:, :10].ravel(), minlength=9)[1:]
    assert counts.min() > 0.9 * counts.mean()
    assert (x[:, 10:10 + T - 1] == 0).all() and (x[:, 10 + T - 1] == 9).all() and (x[:, -10:] == 0).all()
    assert (y[:, : T + 10] == 0).all()
    np.testing.assert_array_equal(y[:, -10:], x[:, :10])  # recall the symbols after the delimiter


def test_copy_memory_baseline_is_the_memoryless_cross_entropy(copy10):
    import keras

    b, (x, y) = copy10
    meta = b.info.metadata
    assert meta["baseline_loss"] == pytest.approx(10 * math.log(8) / (10 + 20))
    # Memoryless predictor: blank with certainty for the first T + 10 steps, uniform over 1..8 afterwards.
    logits = np.full((len(y), 30, 10), -1e9, np.float32)
    logits[:, :20, 0] = 0.0
    logits[:, 20:, 1:9] = 0.0
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert float(ce) == pytest.approx(meta["baseline_loss"], rel=1e-5)


def test_load_describes_sequence_tasks(tfds_dir):
    add = data.load(DataConfig(name="adding_problem/T50", data_dir=tfds_dir, batch_size=32), seed=0)
    assert add.info.input_shape == (50, 2) and add.info.num_outputs == 1 and add.info.task == "regression"
    assert add.info.metadata["baseline_loss"] == pytest.approx(1 / 6)
    x, y = next(iter(add.train))
    assert tuple(x.shape) == (32, 50, 2) and tuple(y.shape) == (32, 1)

    cp = data.load(DataConfig(name="copy_memory/T10", data_dir=tfds_dir, batch_size=16), seed=0)
    assert cp.info.input_shape == (30,) and cp.info.num_outputs == 10 and cp.info.task == "classification"
    x, y = next(iter(cp.train))
    assert x.dtype.name == "int32" and tuple(x.shape) == (16, 30) and tuple(y.shape) == (16, 30)


def _digits(tfds_dir, **transform):
    cfg = DataConfig(name="digits", data_dir=tfds_dir, batch_size=8, shuffle_buffer=0, transform=transform)
    d = data.load(cfg, seed=0)
    x, y = next(iter(d.train))
    return d.info, x.numpy(), y.numpy()


def test_sequence_transform_on_digits(tfds_dir):
    from ablations.data.sequence import permutation

    info, img, labels = _digits(tfds_dir)
    assert img.shape == (8, 8, 8, 1)
    info_p, pix, l2 = _digits(tfds_dir, sequence={"mode": "pixels"})
    assert info_p.input_shape == (64, 1) and pix.shape == (8, 64, 1)
    np.testing.assert_array_equal(l2, labels)
    np.testing.assert_array_equal(pix[:, 8 * 3 + 5, 0], img[:, 3, 5, 0])  # pixel (i, j) is step 8 i + j
    info_r, rows, _ = _digits(tfds_dir, sequence={"mode": "rows"})
    assert info_r.input_shape == (8, 8)
    np.testing.assert_array_equal(rows, img[..., 0])
    _, perm, _ = _digits(tfds_dir, sequence={"mode": "pixels", "permute": 3})
    p = permutation(64, 3)
    np.testing.assert_array_equal(perm, pix[:, p])  # one fixed permutation, the same for every example
    assert not np.array_equal(p, permutation(64, 4))


def test_transform_config_is_strict(tfds_dir):
    with pytest.raises(ConfigError, match="mode"):
        parse_experiment({"name": "x", "data": {"transform": {"sequence": {"mode": "columns"}}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_experiment({"name": "x", "data": {"transform": {"sequence": {"mode": "rows", "shuffle": 1}}}})
    exp = parse_experiment({"name": "x", "grid": {"data.transform.sequence.permute": [None, 0]},
                            "data": {"transform": {"sequence": {"mode": "pixels"}}}})
    assert [a.config.data.transform.sequence.permute for a in exp.arms()] == [None, 0]
    with pytest.raises(data.DataError, match="transform.sequence: applies to image datasets only"):
        data.load(DataConfig(name="adding_problem/T50", data_dir=tfds_dir, transform={"sequence": {"mode": "rows"}}),
                  seed=0)
