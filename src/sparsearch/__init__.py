"""sparsearch: find, train, compare and ship sparse neural networks in PyTorch."""

from sparsearch.algorithms import (
    GMP,
    PGF,
    SET,
    SNIP,
    SRSTE,
    GraSP,
    IterativeMagnitudePruning,
    RigL,
    SparseIFT,
    StaticMagnitude,
    StaticRandom,
    StaticSparsifier,
    SynFlow,
    imp,
    quickselection,
    sparse_ift,
    sparse_soup,
    train_continual,
)
from sparsearch.engine import LayerSparsity, Sparsifier, StaticMaskSparsifier
from sparsearch.io import Checkpoint, load, save

__version__ = "0.1.0"
__all__ = [
    "GMP",
    "PGF",
    "SET",
    "SNIP",
    "SRSTE",
    "Checkpoint",
    "GraSP",
    "IterativeMagnitudePruning",
    "LayerSparsity",
    "RigL",
    "SparseIFT",
    "Sparsifier",
    "StaticMagnitude",
    "StaticMaskSparsifier",
    "StaticRandom",
    "StaticSparsifier",
    "SynFlow",
    "__version__",
    "imp",
    "load",
    "quickselection",
    "save",
    "sparse_ift",
    "sparse_soup",
    "train_continual",
]
