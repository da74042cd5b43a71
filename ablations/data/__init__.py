"""Datasets: TFDS builders (bundled ones prepared locally) turned into batched tf.data pipelines.

Every dataset, bundled or from the TFDS catalog, goes through ``tfds.load`` the same way. Bundled builders
are registered in :data:`BUNDLED` (name -> module that defines the builder); any other name is passed to
TFDS unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from ablations import compat
from zoo.registry import Registry, suggest

# Bundled builders: importing the module registers the TFDS builder class.
BUNDLED: Registry[str] = Registry("bundled dataset")
BUNDLED.register("digits", "ablations.data.digits")
BUNDLED.register("adding_problem", "ablations.data.adding")  # configs T50 ... T1000: "adding_problem/T100"
BUNDLED.register("copy_memory", "ablations.data.copy_memory")  # configs T10 ... T500: "copy_memory/T100"


def seeded_shuffle(ds: Any, buffer: int, seed: int, k: Any) -> Any:
    """``ds.shuffle(buffer)`` in the order fixed by the op seeds ``(seed, k)``, with ``k`` a tensor if need be.

    ``Dataset.shuffle`` takes a Python seed only (it compares seeds in Python) and mixes in the global seed;
    the ShuffleDataset op itself takes both seeds as tensors, so epoch ``k`` can be rebuilt inside a
    ``flat_map`` over epoch numbers. Public API only: ``tf.raw_ops`` and the variant round trip. The op reads
    the seed pair (0, 0) as "pick a random seed", so seed2 is ``k + 1``: arm seed 0 stays deterministic.
    """
    import tensorflow as tf

    spec = ds.element_spec
    flat = tf.nest.flatten(spec)
    variant = tf.raw_ops.ShuffleDataset(
        input_dataset=tf.data.experimental.to_variant(ds), buffer_size=tf.constant(buffer, tf.int64),
        seed=tf.constant(seed, tf.int64), seed2=tf.cast(k, tf.int64) + 1, reshuffle_each_iteration=False,
        output_types=[s.dtype for s in flat], output_shapes=[s.shape for s in flat])
    return tf.data.experimental.from_variant(variant, spec)


class DataError(RuntimeError):
    """A dataset that cannot be loaded; the message says why and how to fix it."""


@dataclasses.dataclass
class DataInfo:
    """What the model and the loss need to know about a dataset."""

    name: str
    input_shape: tuple[int, ...]
    num_outputs: int
    task: str  # "classification" | "regression"
    train_examples: int
    val_examples: int | None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Data:
    train: Any  # tf.data.Dataset of (x, y) batches: one epoch (a batch for LSUV, snapshots)
    val: Any | None
    info: DataInfo
    steps_per_epoch: int
    epoch: Any = None  # epoch(k, start=0) -> epoch k's batches from batch `start` on (training, resumes)
    stream: Any = None  # stream(start_step) -> every epoch back to back from that batch on (training)


# HTTP retries per download file (TFDS' default is 10: ~205 s of back-off before a missing network shows);
# $GRADZOO_DOWNLOAD_RETRIES overrides it on a flaky connection.
DOWNLOAD_RETRIES = int(os.environ.get("GRADZOO_DOWNLOAD_RETRIES", "3"))


def default_data_dir() -> str:
    """``$GRADZOO_DATA_DIR``, else TFDS' default (``~/tensorflow_datasets``)."""
    return os.environ.get("GRADZOO_DATA_DIR") or str(Path("~/tensorflow_datasets").expanduser())


def _close_names(name: str) -> str:
    """`` Did you mean 'digits'?`` from the bundled names and the TFDS catalog (empty when nothing is close)."""
    import tensorflow_datasets as tfds

    try:
        catalog = list(tfds.list_builders(with_community_datasets=False))
    except Exception:  # the catalog list is a convenience: never let it replace the real error
        catalog = []
    return suggest(name.split("/")[0].split(":")[0], [*BUNDLED.names(), *catalog])


def builder(name: str, data_dir: str | None = None, download: bool = True):
    """Returns the prepared TFDS builder ``name`` (bundled builders are prepared on first use)."""
    import tensorflow_datasets as tfds

    data_dir = data_dir or default_data_dir()
    bundled = name.split("/")[0].split(":")[0] in BUNDLED
    if bundled:
        importlib.import_module(BUNDLED.get(name.split("/")[0].split(":")[0]))
    try:
        b = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # DatasetNotFoundError and friends
        raise DataError(
            f"dataset '{name}' is not a TFDS dataset ({type(err).__name__}: {str(err).splitlines()[0]})."
            f"{_close_names(name)} Bundled datasets: "
            f"{', '.join(BUNDLED.names())}; any name from the TFDS catalog also works where it can be prepared."
        ) from None
    if not _prepared(b):
        if not bundled and not download:
            raise DataError(
                f"dataset '{name}' is not prepared in {data_dir} and data.download is false. Prepare it "
                f"(`tfds build {name} --data_dir DIR`, or place the files TFDS asks for in DIR/downloads/manual) "
                f"and point `data.data_dir` or $GRADZOO_DATA_DIR at DIR, or set data.download: true."
            )
        try:
            _quiet_downloads()
            with compat.tfds_download_retries(DOWNLOAD_RETRIES):
                b.download_and_prepare()
        except Exception as err:
            if bundled:
                raise
            raise DataError(
                f"dataset '{name}' is not prepared in {data_dir} and could not be downloaded "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Prepare it on a machine "
                f"with network access (`tfds build {name} --data_dir DIR`, or place the files TFDS asks for "
                f"in DIR/downloads/manual) and point `data.data_dir` or $GRADZOO_DATA_DIR at DIR."
            ) from None
    return b


def _quiet_downloads() -> None:
    """No TFDS progress bars in a log that is not a terminal (they print a line per refresh there), and no
    urllib3 line per HTTP retry unless ``--verbose`` (for the process: TFDS' download threads outlive a failed
    ``download_and_prepare``); the error that matters is raised as ours."""
    import logging

    import tensorflow_datasets as tfds

    from ablations.quiet import is_quiet

    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
    if is_quiet():
        logging.getLogger("urllib3").setLevel(logging.ERROR)


def _prepared(b: Any) -> bool:
    import tensorflow as tf

    return tf.io.gfile.exists(os.path.join(str(b.data_dir), "dataset_info.json"))


def _describe(name: str, info: Any) -> DataInfo:
    import tensorflow_datasets as tfds

    keys = info.supervised_keys
    if not keys:
        raise DataError(f"dataset '{name}' has no supervised_keys (input, target); gradzoo needs labelled data")
    x_feat, y_feat = info.features[keys[0]], info.features[keys[1]]
    if isinstance(y_feat, tfds.features.Sequence) and isinstance(y_feat.feature, tfds.features.ClassLabel):
        # A label per time step (copy task): per-token classification, the model outputs [B, T, classes].
        task, num_outputs = "classification", y_feat.feature.num_classes
    elif isinstance(y_feat, tfds.features.ClassLabel):
        task, num_outputs = "classification", y_feat.num_classes
    else:
        task, num_outputs = "regression", int(max(1, int(__import__("numpy").prod(y_feat.shape or (1,)))))
    return DataInfo(name=name, input_shape=tuple(x_feat.shape), num_outputs=num_outputs, task=task,
                    train_examples=0, val_examples=None, metadata=dict(info.metadata or {}))


def check(cfg: Any) -> DataInfo:
    """Opens the dataset of a :class:`~ablations.config.DataConfig` as :func:`load` would (preparing it if
    needed) and checks the splits, the batch size and the transform, without building any pipeline.

    Raises:
        DataError: unknown or unpreparable dataset, missing split, batch larger than the data, bad transform.
    """
    return _describe_config(cfg, builder(cfg.name, cfg.data_dir, cfg.download))[0]


def _describe_config(cfg: Any, b: Any) -> tuple[DataInfo, Any]:
    """``(info, to_sequence or None)`` of a prepared builder for this data config (see :func:`check`)."""
    import tensorflow_datasets as tfds

    info = _describe(cfg.name, b.info)
    seq = getattr(getattr(cfg, "transform", None), "sequence", None)
    to_sequence = None
    if seq is not None:  # images read as sequences (pixel by pixel or row by row), optionally permuted
        from ablations.data.sequence import make_transform, sequence_shape

        try:
            if not isinstance(b.info.features[b.info.supervised_keys[0]], tfds.features.Image):
                raise ValueError("applies to image datasets only (its input is not a tfds Image feature)")
            to_sequence = make_transform(info.input_shape, seq.mode, seq.permute)
            info.input_shape = sequence_shape(info.input_shape, seq.mode)
        except ValueError as err:
            raise DataError(f"dataset '{cfg.name}': data.transform.sequence: {err}") from None
    splits = b.info.splits

    def split_size(split: str) -> int:
        try:
            return int(splits[split].num_examples)
        except Exception:
            raise DataError(f"dataset '{cfg.name}' has no split '{split}'. Splits: {', '.join(splits)}") from None

    n_train = split_size(cfg.train_split)
    if cfg.max_train_examples:
        n_train = min(n_train, cfg.max_train_examples)
    n_val = split_size(cfg.val_split) if cfg.val_split else None
    info.train_examples, info.val_examples = n_train, n_val
    if n_train < cfg.batch_size:
        raise DataError(f"data.batch_size {cfg.batch_size} is larger than the {n_train} training examples "
                        f"of '{cfg.name}' (split {cfg.train_split}"
                        f"{f', max_train_examples {cfg.max_train_examples}' if cfg.max_train_examples else ''})")
    return info, to_sequence


def load(cfg: Any, seed: int) -> Data:
    """Builds the training and validation pipelines for a :class:`~ablations.config.DataConfig`.

    Images are scaled to [0, 1] floats; training data is cached, shuffled with the arm's seed (epoch k in
    the order of seeds (seed, k), whatever was iterated before), batched with a fixed batch size (drop remainder, so every step sees the same batch size)
    and prefetched.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    b = builder(cfg.name, cfg.data_dir, cfg.download)
    info, to_sequence = _describe_config(cfg, b)
    n_train = info.train_examples

    def prep(x: Any, y: Any) -> tuple[Any, Any]:
        if x.dtype == tf.uint8:
            x = tf.cast(x, tf.float32) / 255.0
        elif x.dtype.is_integer:  # token ids (copy task): the model's embedding/one-hot stem reads them
            return tf.cast(x, tf.int32), y
        x = tf.cast(x, tf.float32)
        return (to_sequence(x) if to_sequence is not None else x), y

    load_kw = dict(data_dir=cfg.data_dir or default_data_dir(), as_supervised=True, download=False,
                   shuffle_files=False)
    train = tfds.load(cfg.name, split=cfg.train_split, **load_kw)
    if cfg.max_train_examples:
        train = train.take(cfg.max_train_examples)
    cached = train.map(prep, num_parallel_calls=tf.data.AUTOTUNE).cache()

    buffer = min(cfg.shuffle_buffer, n_train)

    def batches(k: Any) -> Any:
        # Epoch k in its own order: a shuffle seeded by (arm seed, k), not by how many iterators were made
        # before (Keras makes more than one per epoch), so any epoch, from any batch on, can be rebuilt
        # exactly when an arm resumes. `k` may be a tensor (inside flat_map): no Python branch on it here.
        ds = seeded_shuffle(cached, buffer, seed, k) if cfg.shuffle_buffer else cached
        return ds.batch(cfg.batch_size, drop_remainder=True)

    def epoch(k: int = 0, start: int = 0) -> Any:
        ds = batches(k)
        return (ds.skip(start) if start else ds).prefetch(tf.data.AUTOTUNE)

    def stream(start: int = 0) -> Any:
        # Every epoch back to back from batch `start` on (train.steps_per_epoch set: Keras keeps one iterator
        # across epochs): training resumed at step `start` sees the batches of an uninterrupted run.
        per_epoch = n_train // cfg.batch_size
        first, skip = divmod(start, per_epoch)
        epochs = tf.data.Dataset.range(first, first + 1_000_000).flat_map(batches)
        return (epochs.skip(skip) if skip else epochs).prefetch(tf.data.AUTOTUNE)

    train = epoch(0)
    val = None
    if cfg.val_split:
        val = tfds.load(cfg.name, split=cfg.val_split, **load_kw)
        val = val.map(prep, num_parallel_calls=tf.data.AUTOTUNE).cache().batch(cfg.batch_size)
        val = val.prefetch(tf.data.AUTOTUNE)
    return Data(train=train, val=val, info=info, steps_per_epoch=n_train // cfg.batch_size, epoch=epoch,
                stream=stream)
