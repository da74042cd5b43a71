"""Catalog datasets (mnist, cifar10, fashion_mnist) through ``ablate run`` end to end, offline.

``tfds.testing.mock_data`` replaces the records with random examples, but it needs each dataset's metadata
(``dataset_info.json`` with the splits, ``features.json``) in its ``data_dir`` and ignores the one a caller
passes (it injects its own): the TFDS wheel ships no metadata for catalog datasets (``testing/metadata`` is
absent) and nothing can be downloaded here, and without the split sizes the loader rightly refuses ("no
split 'train'"). So :func:`write_metadata` writes it from the builder's own code (features, supervised keys)
plus split sizes, and the mock and ``data.data_dir`` both point at that folder. What is checked is the
catalog passthrough of :mod:`ablations.data`: the builder by name, the prepared check, the split sizes, the
supervised keys, uint8 -> [0, 1] scaling and the input shape and class count given to the zoo model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
import yaml

from ablations.cli import main

N = 32  # mock examples per split
CASES = {"mnist": ("plain_mlp", (28, 28, 1)), "fashion_mnist": ("plain_mlp", (28, 28, 1)),
         "cifar10": ("plain_cnn", (32, 32, 3))}


def write_metadata(name: str, data_dir: Path, n: int) -> Path:
    """``dataset_info.json`` + ``features.json`` of a catalog dataset, from its builder class, with ``train``
    and ``test`` splits of ``n`` examples each (what ``download_and_prepare`` would have written)."""
    b = tfds.builder(name, data_dir=str(data_dir))
    template = tfds.core.naming.ShardedFileTemplate(data_dir=b.data_dir, dataset_name=b.name,
                                                    filetype_suffix="tfrecord", split="train")
    b.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=template.replace(split=s))
        for s in ("train", "test")]))
    os.makedirs(b.data_dir, exist_ok=True)
    b.info.write_to_directory(b.data_dir)
    return Path(b.data_dir)


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("catalog")
    for name in CASES:
        write_metadata(name, d, N)
    return d


@pytest.mark.parametrize("name", list(CASES))
def test_catalog_dataset_runs_end_to_end_under_mock_data(name, catalog_dir, tmp_path, no_op_determinism):
    # In-process (the mock patches this process): the arm turns TF op determinism on, the fixture restores it.
    arch, shape = CASES[name]
    cfg = {"name": f"mock_{name}", "data": {"name": name, "data_dir": str(catalog_dir), "download": False,
                                          "batch_size": 8},
           "model": {"arch": arch, "depth": 2, "width": 8},
           "train": {"epochs": 1, "steps_per_epoch": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(catalog_dir)):
        rc = main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "runs"), "--no-report"])
    assert rc == 0
    arm = next((tmp_path / "runs" / f"mock_{name}" / "arms").iterdir())
    s = json.loads((arm / "summary.json").read_text())
    assert s["status"] == "completed" and s["dataset"] == name and s["steps"] == 3, s.get("error")
    assert s["final"]["val_loss"] is not None  # the test split went through too
    import keras

    net = keras.saving.load_model(arm / "final.keras")
    assert net.input_shape[1:] == shape and net.output_shape[-1] == 10


def test_the_catalog_loader_scales_images_and_reads_the_split_sizes(catalog_dir):
    from ablations.config import DataConfig
    from ablations.data import load

    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(catalog_dir)):
        data = load(DataConfig(name="cifar10", data_dir=str(catalog_dir), download=False, batch_size=8), 0)
        x, y = next(iter(data.train))
    assert (data.info.input_shape, data.info.num_outputs, data.info.task) == ((32, 32, 3), 10, "classification")
    assert data.info.train_examples == N and data.steps_per_epoch == N // 8
    assert x.dtype.name == "float32" and 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 1.0
    assert float(x.numpy().max()) > 0.5  # random uint8 pixels scaled, not left at 0..255 or zeroed
