"""Your own model and data in a sparsearch study: a small ResNet (BatchNorm, residual blocks, a projection
shortcut) on Fashion-MNIST images that this file loads itself into tensors.

Nothing here is part of sparsearch: a study names these functions, from Python
(``run_study(config, model=resnet, data=fashion_subset)``) or from a study file
(``model = "resnet_fashion:resnet"``, ``dataset = "resnet_fashion:fashion_subset"``; see resnet_fashion.toml).
Both are functions of the seed: ``resnet(seed) -> nn.Module`` and ``fashion_subset(seed) -> DataSplits``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sparsearch.data import DataSplits, make_splits, read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a 1x1 conv + BN where the shape changes), then ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem (3x3 conv, stride 2) -> a block at ``width`` -> a block at 2x ``width``, stride 2 -> pool -> Linear."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = BasicBlock(width, width)
        self.stage2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


def resnet(seed: int, width: int = 8) -> nn.Module:
    """The parent network of the study; same seed -> same initial weights."""
    torch.manual_seed(seed)
    return ResNet(width=width)


def _images(kind: str, count: int) -> tuple[Tensor, Tensor]:
    images = read_idx(FASHION_MNIST / f"{kind}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION_MNIST / f"{kind}-labels-idx1-ubyte.gz")[:count]
    x = torch.from_numpy(images).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)  # (n, 1, 28, 28)
    return x, torch.from_numpy(labels).long()


def fashion_subset(seed: int, n_train: int = 6_000, n_test: int = 2_000) -> DataSplits:
    """The first ``n_train`` training and ``n_test`` test images as tensors; validation: 10% of the training
    images, drawn with ``seed``."""
    return make_splits(
        train=_images("train", n_train), test=_images("t10k", n_test), seed=seed, name="fashion-mnist-subset"
    )


def fashion_quick(seed: int) -> DataSplits:
    """1,000 training and 500 test images: a first run in seconds."""
    return fashion_subset(seed, n_train=1_000, n_test=500)
