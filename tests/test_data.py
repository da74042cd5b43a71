"""Datasets: the bundled digits TFDS builder and the tf.data pipelines built from it (no network, ever)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import ablations.data as data
from ablations.config import DataConfig


@pytest.fixture(scope="module")
def _data_dir(request, tmp_path_factory) -> str:
    """The suite's shared TFDS dir when conftest provides one, else a private one."""
    try:
        return str(request.getfixturevalue("tfds_dir"))
    except pytest.FixtureLookupError:
        return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(_data_dir):
    return data.builder("digits", _data_dir, download=False)  # bundled: prepared locally, download unused


@pytest.fixture(scope="module")
def splits(digits):
    import tensorflow_datasets as tfds

    out = {}
    for split in ("train", "test"):
        ds = digits.as_dataset(split=split, shuffle_files=False)
        rows = list(tfds.as_numpy(ds))
        out[split] = (np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows]))
    return out


def _hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(img.tobytes()).hexdigest() for img in images]


def test_digits_split_sizes_and_features(digits):
    assert digits.info.splits["train"].num_examples == 1437
    assert digits.info.splits["test"].num_examples == 360
    assert digits.info.features["image"].shape == (8, 8, 1)
    assert digits.info.features["label"].num_classes == 10
    assert digits.info.supervised_keys == ("image", "label")


def test_digits_examples(splits):
    for split, n in (("train", 1437), ("test", 360)):
        images, labels = splits[split]
        assert images.shape == (n, 8, 8, 1) and images.dtype == np.uint8
        assert set(labels.tolist()) == set(range(10))
        assert images.max() == 255 and images.min() == 0


def test_digits_split_matches_source_and_is_disjoint(splits):
    from ablations.data.digits import NUM_TEST, SPLIT_SEED, load_arrays

    images, labels = load_arrays()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
    test_idx = set(perm[:NUM_TEST].tolist())
    train_idx = set(perm[NUM_TEST:].tolist())
    assert not test_idx & train_idx and len(test_idx | train_idx) == 1797
    # Each split holds exactly the source examples of its index set (order-free comparison by content).
    for split, idx in (("train", train_idx), ("test", test_idx)):
        got = sorted(zip(_hashes(splits[split][0]), splits[split][1].tolist()))
        want = sorted(zip(_hashes(images[sorted(idx)]), labels[sorted(idx)].tolist()))
        assert got == want
    # Pixel values 0..16 are rescaled to 0..255.
    from sklearn.datasets import load_digits

    raw = load_digits().images
    np.testing.assert_array_equal(images[..., 0], np.round(raw * 255.0 / 16.0).astype(np.uint8))
    # No training image appears in the test split by index; identical-looking duplicates in the source data
    # stay where the permutation put them, so compare indices, and check content overlap only as a bound.
    train_h, test_h = set(_hashes(splits["train"][0])), set(_hashes(splits["test"][0]))
    all_h = _hashes(images)
    dup = {h for h in all_h if all_h.count(h) > 1}
    assert (train_h & test_h) <= dup


def test_digits_builds_deterministically(splits, tmp_path):
    import tensorflow_datasets as tfds

    other = data.builder("digits", str(tmp_path))
    assert str(other.data_dir).startswith(str(tmp_path))
    for split in ("train", "test"):
        rows = list(tfds.as_numpy(other.as_dataset(split=split, shuffle_files=False)))
        np.testing.assert_array_equal(np.stack([r["image"] for r in rows]), splits[split][0])
        np.testing.assert_array_equal(np.array([r["label"] for r in rows]), splits[split][1])


def test_load_batches(_data_dir, digits):
    d = data.load(DataConfig(data_dir=_data_dir, batch_size=32), seed=0)
    assert d.steps_per_epoch == 1437 // 32
    assert d.info.input_shape == (8, 8, 1) and d.info.num_outputs == 10
    assert d.info.task == "classification"
    assert d.info.train_examples == 1437 and d.info.val_examples == 360
    batches = list(d.train.as_numpy_iterator())
    assert len(batches) == 1437 // 32  # drop_remainder
    x, y = batches[0]
    assert x.shape == (32, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == (32,)
    xs = np.concatenate([b[0] for b in batches])
    assert xs.min() == 0.0 and xs.max() == 1.0
    # Scaled by 1/255 exactly.
    np.testing.assert_allclose(np.unique(xs * 255.0), np.round(np.unique(xs * 255.0)), atol=1e-4)
    val = list(d.val.as_numpy_iterator())
    assert sum(len(v[1]) for v in val) == 360  # validation keeps every example
    assert val[0][0].dtype == np.float32


def test_load_shuffles_by_seed(_data_dir, digits):
    cfg = DataConfig(data_dir=_data_dir, batch_size=16)

    def first_labels(seed: int) -> np.ndarray:
        x, y = next(iter(data.load(cfg, seed=seed).train.as_numpy_iterator()))
        return np.concatenate([y, x.reshape(len(x), -1).sum(axis=1)])

    a, b, c = first_labels(1), first_labels(1), first_labels(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_epoch_orders_are_fixed_by_seed_and_epoch_and_the_stream_is_them_back_to_back(_data_dir, digits):
    # Seed 0 included: the shuffle op reads the seed pair (0, 0) as "random", which must never happen here.
    cfg = DataConfig(data_dir=_data_dir, batch_size=100, val_split=None)

    def labels(ds) -> np.ndarray:
        return np.concatenate([y for _, y in ds.as_numpy_iterator()])

    d0, again = data.load(cfg, seed=0), data.load(cfg, seed=0)
    per_epoch = d0.steps_per_epoch
    e0, e1 = labels(d0.epoch(0)), labels(d0.epoch(1))
    np.testing.assert_array_equal(e0, labels(again.epoch(0)))  # a fresh load, same order
    np.testing.assert_array_equal(e0, labels(d0.epoch(0)))  # iterating again never reshuffles
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, labels(data.load(cfg, seed=1).epoch(0)))
    np.testing.assert_array_equal(labels(d0.epoch(1, start=3)), e1[300:])  # a resume inside epoch 1
    stream = labels(d0.stream(per_epoch - 2).take(4))  # the last two batches of epoch 0, the first two of 1
    np.testing.assert_array_equal(stream, np.concatenate([e0[-200:], e1[:200]]))


def test_load_max_train_examples_and_no_shuffle(_data_dir, digits, splits):
    cfg = DataConfig(data_dir=_data_dir, batch_size=10, max_train_examples=50, shuffle_buffer=0, val_split=None)
    d = data.load(cfg, seed=0)
    assert d.steps_per_epoch == 5 and d.info.train_examples == 50 and d.val is None
    ys = np.concatenate([y for _, y in d.train.as_numpy_iterator()])
    np.testing.assert_array_equal(ys, splits["train"][1][:50])  # unshuffled: file order


def test_batch_larger_than_dataset(_data_dir, digits):
    cfg = DataConfig(data_dir=_data_dir, batch_size=64, max_train_examples=20)
    with pytest.raises(data.DataError, match="batch_size 64 is larger than the 20 training examples"):
        data.load(cfg, seed=0)


def test_unknown_split(_data_dir, digits):
    with pytest.raises(data.DataError, match="has no split 'validation'. Splits: train, test"):
        data.load(DataConfig(data_dir=_data_dir, val_split="validation"), seed=0)


def test_unknown_dataset_lists_bundled(_data_dir):
    with pytest.raises(data.DataError) as info:
        data.builder("no_such_dataset_xyz", _data_dir)
    msg = str(info.value)
    assert msg.startswith("dataset 'no_such_dataset_xyz' is not a TFDS dataset")
    assert "Bundled datasets: " in msg and "digits" in msg.split("Bundled datasets: ")[1]


@pytest.mark.parametrize("typo, meant", [("digitz", "digits"), ("mnits", "mnist"), ("cifar_10", "cifar10")])
def test_a_misspelt_dataset_gets_the_close_bundled_or_catalog_name(_data_dir, typo, meant):
    with pytest.raises(data.DataError, match=f"Did you mean '{meant}'"):
        data.builder(typo, _data_dir)


def test_unprepared_catalog_dataset_without_download(tmp_path):
    # Never download=True here: TFDS would try the network.
    cfg = DataConfig(name="mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(data.DataError) as info:
        data.load(cfg, seed=0)
    msg = str(info.value)
    assert f"dataset 'mnist' is not prepared in {tmp_path}" in msg
    assert "tfds build mnist --data_dir DIR" in msg
    assert "GRADZOO_DATA_DIR" in msg
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").rglob("*.tfrecord*"))


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADZOO_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("GRADZOO_DATA_DIR")
    assert data.default_data_dir().endswith("tensorflow_datasets")


def test_a_download_retries_a_few_times_not_tfds_ten_and_fails_as_a_data_error(tmp_path, monkeypatch):
    """TFDS' 10 retries with back-off took ~205 s per dataset on a machine without network; we ask for 3."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    seen = []

    def offline(self, *a, **k):
        seen.append(downloader.MAX_RETRIES)
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    with pytest.raises(data.DataError, match="'mnist' is not prepared .* could not be downloaded .*ConnectionError"):
        data.builder("mnist", str(tmp_path), download=True)
    assert seen == [data.DOWNLOAD_RETRIES] == [3]
    assert downloader.MAX_RETRIES == 10  # restored
