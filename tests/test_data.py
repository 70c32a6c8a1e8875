"""Offline data sets: fixed test splits, seeded validation splits carved from training data, caching, errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from sparsearch.data import DATASETS, FASHION_MNIST_DIR, load_dataset, parse_idx, read_idx


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_digits_splits_have_the_promised_shapes_types_and_sizes():
    data = load_dataset("digits", seed=0, val_fraction=0.1)
    assert data.input_shape == (1, 8, 8)
    assert data.x_train.shape[1:] == (1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10
    sizes = data.sizes()
    assert sizes["test"] == 360  # 36 per class held out
    assert sizes["train"] + sizes["val"] == 1797 - 360
    assert sizes["val"] == int(np.ceil(0.1 * (1797 - 360)))
    assert torch.bincount(data.y_test).tolist() == [36] * 10
    # standardised with the training pool's statistics
    pool = torch.cat([data.x_train, data.x_val])
    assert abs(float(pool.mean())) < 1e-3 and abs(float(pool.std()) - 1) < 1e-2


def test_validation_is_carved_from_training_data_by_the_seed_and_test_never_moves():
    first = load_dataset("digits", seed=0)
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    assert torch.equal(first.x_val, again.x_val) and torch.equal(first.y_train, again.y_train)
    assert not torch.equal(first.x_val, other.x_val)
    assert torch.equal(first.x_test, other.x_test) and torch.equal(first.y_test, other.y_test)
    # the same pool of training samples, only split differently
    pool_first = sorted(_rows(torch.cat([first.x_train, first.x_val])))
    pool_other = sorted(_rows(torch.cat([other.x_train, other.x_val])))
    assert pool_first == pool_other


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.1"])
def test_bad_val_fraction_is_named(bad):
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \(0, 1\)"):
        load_dataset("digits", val_fraction=bad)


def test_unknown_dataset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown data set 'cifar10'; allowed: mnist1d, fashion-mnist"):
        load_dataset("cifar10")
    assert DATASETS.names()[:4] == ("mnist1d", "fashion-mnist", "mnist5k", "digits")


def test_mnist1d_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    data = load_dataset("mnist1d", cache_dir=tmp_path, mnist1d_samples=500)
    assert data.input_shape == (40,)
    assert data.sizes() == {"train": 360, "val": 40, "test": 100}
    assert data.num_classes == 10
    assert len(list(tmp_path.glob("mnist1d-500-*.npz"))) == 1

    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("make_dataset called although the cache exists")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    cached = load_dataset("mnist1d", cache_dir=tmp_path, mnist1d_samples=500)
    assert torch.equal(cached.x_train, data.x_train) and torch.equal(cached.y_test, data.y_test)


def test_mnist1d_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEARCH_CACHE", str(tmp_path / "env-cache"))
    np.random.seed(5)
    expected_next = np.random.rand()
    np.random.seed(5)
    load_dataset("mnist1d", mnist1d_samples=200)
    assert len(list((tmp_path / "env-cache").glob("mnist1d-200-*.npz"))) == 1
    assert np.random.rand() == expected_next  # generating left the caller's global numpy RNG alone


def test_mnist1d_sample_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match="mnist1d_samples must be an integer >= 50, got 10"):
        load_dataset("mnist1d", cache_dir=tmp_path, mnist1d_samples=10)


def test_mnist5k_has_a_fixed_stratified_test_split():
    data = load_dataset("mnist5k", seed=3)
    assert data.input_shape == (1, 28, 28)
    assert data.sizes() == {"train": 3600, "val": 400, "test": 1000}
    assert torch.bincount(data.y_test).tolist() == [100] * 10
    assert torch.equal(load_dataset("mnist5k", seed=4).y_test, data.y_test)


def test_missing_fashion_mnist_directory_says_how_to_install_it(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", root=missing)
    message = str(info.value)
    assert str(missing) in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "root=" in message and "data_dir" in message


def test_fashion_mnist_directory_without_the_files_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_from_a_given_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_dataset("fashion-mnist", root=tmp_path, val_fraction=0.25)
    assert data.sizes() == {"train": 45, "val": 15, "test": 20}
    assert data.input_shape == (1, 28, 28)
    assert data.y_test.tolist() == [i % 10 for i in range(20)]
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert torch.allclose(data.x_test[:, 0], torch.from_numpy((raw / 255.0 - 0.2860) / 0.3530).float(), atol=1e-6)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist to run")
def test_installed_fashion_mnist_loads_all_images():
    data = load_dataset("fashion-mnist", seed=0)
    assert data.sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    assert abs(float(data.x_train.mean())) < 0.01 and abs(float(data.x_train.std()) - 1) < 0.01


def test_idx_parser_reads_big_endian_sizes_and_rejects_bad_files():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + array.tobytes()
    assert np.array_equal(parse_idx(raw), array)
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match=r"promises shape \(2, 3, 4\)"):
        parse_idx(raw[:-1])
