"""Reference networks (MLP family, small 1-D/2-D CNN) in the ``MODELS`` registry, and their cost: FLOPs and
parameter counts."""

from sparsearch.models.flops import FlopCount, FlopMeter, count_flops, parameter_counts, weight_positions
from sparsearch.models.networks import (
    CNN,
    DEFAULT_CNN_CHANNELS,
    DEFAULT_MLP_WIDTHS,
    MLP,
    MODELS,
    HiddenLayer,
    ModelFactory,
    build_model,
)

__all__ = [
    "CNN",
    "DEFAULT_CNN_CHANNELS",
    "DEFAULT_MLP_WIDTHS",
    "MLP",
    "MODELS",
    "FlopCount",
    "FlopMeter",
    "HiddenLayer",
    "ModelFactory",
    "build_model",
    "count_flops",
    "parameter_counts",
    "weight_positions",
]
