"""The Sparsifier engine: keeps a model's weights, gradients and optimizer state masked."""

from sparsearch.engine.sparsifier import LayerSparsity, Sparsifier, StaticMaskSparsifier

__all__ = ["LayerSparsity", "Sparsifier", "StaticMaskSparsifier"]
