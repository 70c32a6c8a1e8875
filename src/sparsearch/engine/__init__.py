"""The Sparsifier engine: keeps a model's weights, gradients and optimizer state masked."""

from sparsearch.engine.distributed import MaskMismatchError, MaskSync, synchronize
from sparsearch.engine.forward_mask import DenseWeightSparsifier
from sparsearch.engine.sparsifier import (
    LayerSparsity,
    Sparsifier,
    SparsityReport,
    StaticMaskSparsifier,
    default_sparsifiable_parameters,
    mask_distributions,
)

__all__ = [
    "DenseWeightSparsifier",
    "LayerSparsity",
    "MaskMismatchError",
    "MaskSync",
    "Sparsifier",
    "SparsityReport",
    "StaticMaskSparsifier",
    "default_sparsifiable_parameters",
    "mask_distributions",
    "synchronize",
]
