"""Data: offline data sets (MNIST-1D, Fashion-MNIST, MNIST-5k, digits) in the ``DATASETS`` registry behind
``load_dataset``, and ``make_splits`` / ``as_splits`` for your own tensors or torch Datasets."""

from sparsearch.data.datasets import (
    DATASETS,
    FASHION_MNIST_DIR,
    MNIST1D_SAMPLES,
    DatasetLoader,
    default_cache_dir,
    load_dataset,
)
from sparsearch.data.idx import parse_idx, read_idx
from sparsearch.data.splits import DataSplits, as_splits, make_splits

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "MNIST1D_SAMPLES",
    "DataSplits",
    "DatasetLoader",
    "as_splits",
    "default_cache_dir",
    "load_dataset",
    "make_splits",
    "parse_idx",
    "read_idx",
]
