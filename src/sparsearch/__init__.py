"""sparsearch: find, train, compare and ship sparse neural networks in PyTorch."""

from sparsearch.engine import LayerSparsity, Sparsifier, StaticMaskSparsifier

__version__ = "0.1.0"
__all__ = ["LayerSparsity", "Sparsifier", "StaticMaskSparsifier", "__version__"]
