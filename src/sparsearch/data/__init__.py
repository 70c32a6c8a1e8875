"""Data sets that work offline (MNIST-1D, Fashion-MNIST, MNIST-5k, digits) behind ``load_dataset``."""

from sparsearch.data.datasets import (
    DATASETS,
    FASHION_MNIST_DIR,
    MNIST1D_SAMPLES,
    DataSplits,
    default_cache_dir,
    load_dataset,
)
from sparsearch.data.idx import parse_idx, read_idx

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "MNIST1D_SAMPLES",
    "DataSplits",
    "default_cache_dir",
    "load_dataset",
    "parse_idx",
    "read_idx",
]
