"""Registered datasets as NumPy arrays, like keras.datasets: `gpuml.datasets.load("fashion_mnist")`
returns ((x_train, y_train), (x_test, y_test)) with images uint8 (N, 28, 28) and int64 labels.
Files are found or downloaded as for the CLI (gpuml.data.datasets: data.root, $GPUML_DATA, the
caches, then the mirrors), and checked against their sha256."""

from __future__ import annotations

import os

import numpy as np

from gpuml.data.datasets import DATASETS

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def load(name: str, root: str | os.PathLike[str] | None = None, download: bool = True) -> Arrays:
    """((x_train, y_train), (x_test, y_test)) of dataset `name` (one of `names()`); images
    with one channel come as (N, H, W), like Keras's."""
    from gpuml.data.loader import load_dataset

    d = load_dataset(name, root, val_split=0, download=download)

    def images(x: np.ndarray) -> np.ndarray:
        return x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x

    return (images(d.train.images), d.train.labels), (images(d.test.images), d.test.labels)


def names() -> list[str]:
    """The registered datasets `load` knows."""
    return sorted(DATASETS)
