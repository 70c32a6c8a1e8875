"""Sparse-architecture search: node and weight search spaces, candidate scorers, Random Search."""

from sparsearch.search.random_search import SearchResult, check_scorer, random_search
from sparsearch.search.scorers import (
    SCORERS,
    Score,
    Scorer,
    ScoringContext,
    short_train_evaluation,
    short_train_score,
    snip_score,
    synflow_score,
)
from sparsearch.search.spaces import (
    SPACES,
    NodeSpace,
    SearchSpace,
    WeightSpace,
    hidden_layers_of,
    make_space,
    node_sparsity,
    rescale_to_fan_in,
    weight_sparsity,
)

__all__ = [
    "SCORERS",
    "SPACES",
    "NodeSpace",
    "Score",
    "Scorer",
    "ScoringContext",
    "SearchResult",
    "SearchSpace",
    "WeightSpace",
    "check_scorer",
    "hidden_layers_of",
    "make_space",
    "node_sparsity",
    "random_search",
    "rescale_to_fan_in",
    "short_train_evaluation",
    "short_train_score",
    "snip_score",
    "synflow_score",
    "weight_sparsity",
]
