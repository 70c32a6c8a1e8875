"""Reference networks (MLP family, small 1-D/2-D CNN) and their cost: FLOPs and parameter counts."""

from sparsearch.models.flops import FlopCount, count_flops, parameter_counts, weight_positions
from sparsearch.models.networks import (
    ARCHITECTURES,
    CNN,
    DEFAULT_CNN_CHANNELS,
    DEFAULT_MLP_WIDTHS,
    MLP,
    HiddenLayer,
    build_model,
)

__all__ = [
    "ARCHITECTURES",
    "CNN",
    "DEFAULT_CNN_CHANNELS",
    "DEFAULT_MLP_WIDTHS",
    "MLP",
    "FlopCount",
    "HiddenLayer",
    "build_model",
    "count_flops",
    "parameter_counts",
    "weight_positions",
]
