"""Reference networks for sparse-architecture studies: an MLP family and a small CNN (1-D or 2-D).

Both expose ``hidden_layers()``: for every hidden layer, which weight produces its units (rows) and which
weight consumes them (columns). The node search space uses it to remove whole neurons / channels.

Default parents are deliberately over-parameterised for the offline data sets: MLP widths (512, 512, 256)
(~0.43 M weights on MNIST-1D, where a 100-unit MLP already reaches the same accuracy), CNN channels
(32, 64, 64).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsearch.registry import Registry

ModelFactory = Callable[..., nn.Module]
# factory(input_shape, num_classes, widths) -> nn.Module, called under a seeded RNG by build_model;
# register yours with @MODELS.register("name") or the entry-point group "sparsearch.models"
MODELS: Registry[ModelFactory] = Registry("model", "sparsearch.models")
DEFAULT_MLP_WIDTHS: tuple[int, ...] = (512, 512, 256)
DEFAULT_CNN_CHANNELS: tuple[int, ...] = (32, 64, 64)


@dataclass(frozen=True)
class HiddenLayer:
    """One hidden layer of units (neurons or channels) and the weights touching them.

    Unit ``i`` is produced by row ``i`` (output index) of ``producer`` and read by columns
    ``i * consumer_group ... (i + 1) * consumer_group - 1`` (input index) of ``consumer``; ``consumer_group`` > 1
    where a flatten sits between a conv and a linear layer (channel-major flatten).
    """

    producer: str
    consumer: str
    units: int
    consumer_group: int = 1


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(widths) -> Linear to the classes."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        sizes = [math.prod(self.input_shape), *widths, num_classes]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(sizes))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    def hidden_layers(self) -> list[HiddenLayer]:
        """Every hidden Linear output, consumed by the next Linear."""
        return [
            HiddenLayer(f"layers.{i}.weight", f"layers.{i + 1}.weight", self.layers[i].out_features)
            for i in range(len(self.layers) - 1)
        ]


class CNN(nn.Module):
    """[Conv (kernel 5 for 1-D, 3 for 2-D, same padding) -> ReLU -> MaxPool 2] * len(channels) -> Linear.

    1-D convolutions for inputs of shape (length,) or (channels, length); 2-D for (channels, height, width).
    Pooling stops once the spatial size would drop below 1, so small inputs (8x8 digits) work too.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int]) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            shape = (1, *shape)
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self._conv_input_shape = shape
        spatial_dims = len(shape) - 1
        conv_type = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
        pool_type = nn.MaxPool1d if spatial_dims == 1 else nn.MaxPool2d
        kernel = 5 if spatial_dims == 1 else 3
        spatial = list(shape[1:])
        convs, pools = [], []
        for c_in, c_out in zip([shape[0], *channels[:-1]], channels, strict=True):
            convs.append(conv_type(c_in, c_out, kernel, padding=kernel // 2))
            pool = all(size >= 2 for size in spatial)
            pools.append(pool)
            if pool:
                spatial = [size // 2 for size in spatial]
        self.convs = nn.ModuleList(convs)
        self._pools = tuple(pools)
        self._pool = pool_type(2)
        self.spatial_after_convs = math.prod(spatial)
        self.classifier = nn.Linear(channels[-1] * self.spatial_after_convs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(len(x), *self._conv_input_shape)
        for conv, pool in zip(self.convs, self._pools, strict=True):
            x = torch.relu(conv(x))
            if pool:
                x = self._pool(x)
        return self.classifier(x.flatten(1))

    def hidden_layers(self) -> list[HiddenLayer]:
        """Every conv's output channels, consumed by the next conv or (after flatten) by the classifier."""
        layers = [
            HiddenLayer(f"convs.{i}.weight", f"convs.{i + 1}.weight", self.convs[i].out_channels)
            for i in range(len(self.convs) - 1)
        ]
        last = len(self.convs) - 1
        layers.append(
            HiddenLayer(
                f"convs.{last}.weight", "classifier.weight", self.convs[last].out_channels, self.spatial_after_convs
            )
        )
        return layers


def _sizes(arch: str, what: str, widths: Sequence[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    sizes = tuple(default if widths is None else widths)
    if not sizes or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in sizes):
        raise ValueError(f"{arch} {what} must be a non-empty sequence of positive integers, got {widths!r}")
    return sizes


@MODELS.register("mlp")
def _mlp(input_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] | None = None) -> nn.Module:
    return MLP(input_shape, num_classes, _sizes("mlp", "widths", widths, DEFAULT_MLP_WIDTHS))


@MODELS.register("cnn")
def _cnn(input_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] | None = None) -> nn.Module:
    if len(input_shape) not in (1, 2, 3):
        raise ValueError(
            f"cnn needs input_shape (length,), (channels, length) or (channels, height, width), got {input_shape}"
        )
    return CNN(input_shape, num_classes, _sizes("cnn", "channels", widths, DEFAULT_CNN_CHANNELS))


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: Sequence[int] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a registered network with weights initialised from ``seed`` (same seed -> same weights).

    Args:
        arch: a name in ``MODELS``: "mlp", "cnn" or one you registered.
        input_shape: per-sample shape, e.g. (40,) for MNIST-1D or (1, 28, 28) for images.
        num_classes: number of output classes.
        widths: MLP hidden widths (default ``DEFAULT_MLP_WIDTHS``) or CNN channels (``DEFAULT_CNN_CHANNELS``).
        seed: seed of the weight initialisation; the global torch RNG is left as it was.
    """
    factory = MODELS.get(arch)
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    # fork_rng: the seed decides the weights without disturbing the caller's global random state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(shape, num_classes, widths)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {arch!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model
