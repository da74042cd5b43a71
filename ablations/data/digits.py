"""TFDS builder for scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

Alpaydin & Kaynak 1998, UCI "Optical Recognition of Handwritten Digits" (the copy shipped inside
scikit-learn's wheel, so it works with no network). Pixel values 0..16 are rescaled to 0..255 so the
dataset reads exactly like MNIST.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# Deterministic split: a fixed permutation (seed 0) puts 360 images (20%) in `test`.
SPLIT_SEED = 0
NUM_TEST = 360


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as a TFDS dataset with `train` (1437) and `test` (360) splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="8x8 grey-scale handwritten digits bundled with scikit-learn (UCI optdigits test set).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            citation="Alpaydin, E. & Kaynak, C. (1998). Optical Recognition of Handwritten Digits. UCI.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # bundled data: nothing to download
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        images, labels = load_arrays()
        perm = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
        idx = np.sort(perm[:NUM_TEST] if split == "test" else perm[NUM_TEST:])
        for i in idx:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns all 1797 images as uint8 [N, 8, 8, 1] in 0..255 and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)
