"""Train / validation / test splits (:class:`DataSplits`), and the ways a user's own data becomes them.

:func:`make_splits` takes each split as an ``(inputs, labels)`` pair of tensors or arrays, or as a torch
``Dataset`` whose items are ``(input, label)`` pairs, and carves the validation split from the training data
with a seed when none is given. :func:`as_splits` accepts a :class:`DataSplits` or a mapping
``{"train": ..., "test": ..., "val": ...}`` of the same split forms (what a user's data-set function returns).
Inputs become float32 tensors, labels int64 class indices; every problem is a ValueError naming the split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test tensors of one data set (x float32 normalised, y int64 class indices)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]  # per-sample shape, e.g. (40,) or (1, 28, 28)

    def sizes(self) -> dict[str, int]:
        """Number of samples in each split."""
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


SPLIT_FORMS = "an (inputs, labels) pair of tensors or arrays, or a torch Dataset whose items are (input, label) pairs"


def _split_tensors(split: object, what: str) -> tuple[Tensor, Tensor]:
    """(float32 inputs, int64 labels) of one split given as a pair or a Dataset."""
    if isinstance(split, tuple | list) and len(split) == 2:
        x, y = split
    elif isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__"):
        items = [split[index] for index in range(len(split))]  # type: ignore[arg-type]
        if not items:
            raise ValueError(f"{what} is an empty Dataset")
        if not all(isinstance(item, tuple | list) and len(item) == 2 for item in items[:1]):
            raise ValueError(f"{what}: Dataset items must be (input, label) pairs, got {type(items[0]).__name__}")
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.as_tensor([int(torch.as_tensor(item[1])) for item in items])
    else:
        raise ValueError(f"{what} must be {SPLIT_FORMS}; got {type(split).__name__}")
    try:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: inputs and labels must be tensors or arrays ({error})") from None
    if y.dim() != 1:
        raise ValueError(f"{what}: labels must be one class index per sample (shape (n,)), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        if y.is_floating_point() and bool((y == y.round()).all()):
            y = y.long()
        else:
            raise ValueError(f"{what}: labels must be integer class indices, got dtype {y.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{what}: inputs must have a sample dimension and a per-sample shape, got {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"{what} has no samples")
    if int(y.min()) < 0:
        raise ValueError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")
    return x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous()


def make_splits(
    train: object,
    test: object,
    val: object | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    name: str = "custom",
    num_classes: int | None = None,
) -> DataSplits:
    """Splits from your own data; without ``val``, a ``val_fraction`` of ``train`` chosen with ``seed``.

    Args:
        train, test, val: each an ``(inputs, labels)`` pair of tensors or arrays (inputs shaped
            ``(n, *per_sample_shape)``, labels ``(n,)`` integer class indices) or a torch ``Dataset`` of
            ``(input, label)`` items.
        val_fraction: the part of ``train`` held out for validation when ``val`` is None, in (0, 1).
        seed: seed of that validation draw.
        name: shown in reports and errors.
        num_classes: classes of the task (default: the largest label + 1).
    """
    x_train, y_train = _split_tensors(train, f"{name}: train split")
    x_test, y_test = _split_tensors(test, f"{name}: test split")
    if val is None:
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        n_val = math.ceil(val_fraction * len(y_train))
        if not 0 < n_val < len(y_train):
            raise ValueError(f"{name}: val_fraction {val_fraction} leaves no training data from {len(y_train)}")
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y_train)))
        x_val, y_val = x_train[order[:n_val]], y_train[order[:n_val]]
        x_train, y_train = x_train[order[n_val:]], y_train[order[n_val:]]
    else:
        x_val, y_val = _split_tensors(val, f"{name}: validation split")
    shapes = {"train": tuple(x_train.shape[1:]), "val": tuple(x_val.shape[1:]), "test": tuple(x_test.shape[1:])}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: the splits' per-sample input shapes differ: {shapes}")
    largest = max(int(y_train.max()), int(y_val.max()), int(y_test.max()))
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise ValueError(f"{name}: labels go up to {largest} but num_classes is {num_classes}")
    if num_classes < 2:
        raise ValueError(f"{name}: a classification task needs at least 2 classes, the labels have {num_classes}")
    return DataSplits(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        input_shape=shapes["train"],
    )


def as_splits(data: object, *, seed: int = 0, name: str = "custom", what: str = "data") -> DataSplits:
    """``data`` as :class:`DataSplits`: itself, or a mapping with "train", "test" and optionally "val"."""
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, Mapping):
        keys = set(data)
        if not {"train", "test"} <= keys or keys - {"train", "test", "val"}:
            raise ValueError(
                f"{what} must map 'train', 'test' and optionally 'val' to splits; got keys {sorted(map(str, keys))}"
            )
        options: dict[str, Any] = {"val": data.get("val"), "seed": seed, "name": name}
        return make_splits(data["train"], data["test"], **options)
    raise ValueError(
        f"{what} must be a sparsearch.data.DataSplits or a mapping {{'train': ..., 'test': ..., 'val': ...}} "
        f"whose splits are each {SPLIT_FORMS}; got {type(data).__name__}"
    )
