"""sparsearch: find, train, compare and ship sparse neural networks in PyTorch."""

from sparsearch import runtime  # `sa.runtime.convert(...)`, as the README's "Ship" snippet writes it
from sparsearch.algorithms import (
    GMP,
    PGF,
    SET,
    SNIP,
    SPDF,
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
from sparsearch.engine import LayerSparsity, Sparsifier, SparsityReport, StaticMaskSparsifier
from sparsearch.io import Checkpoint, load, save

__version__ = "0.1.0"
__all__ = [
    "GMP",
    "PGF",
    "SET",
    "SNIP",
    "SPDF",
    "SRSTE",
    "Checkpoint",
    "GraSP",
    "IterativeMagnitudePruning",
    "LayerSparsity",
    "RigL",
    "SparseIFT",
    "Sparsifier",
    "SparsityReport",
    "StaticMagnitude",
    "StaticMaskSparsifier",
    "StaticRandom",
    "StaticSparsifier",
    "SynFlow",
    "__version__",
    "imp",
    "load",
    "quickselection",
    "runtime",
    "save",
    "sparse_ift",
    "sparse_soup",
    "train_continual",
]
