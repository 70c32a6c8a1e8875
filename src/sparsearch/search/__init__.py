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
    make_space,
    node_sparsity,
    rescale_to_fan_in,
    weight_sparsity,
)
from sparsearch.search.units import UnitAnalysis, UnitGroup, UnitSlot, find_unit_groups

__all__ = [
    "SCORERS",
    "SPACES",
    "NodeSpace",
    "Score",
    "Scorer",
    "ScoringContext",
    "SearchResult",
    "SearchSpace",
    "UnitAnalysis",
    "UnitGroup",
    "UnitSlot",
    "WeightSpace",
    "check_scorer",
    "find_unit_groups",
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
