"""Sparse-architecture search: node, weight and allocation spaces, candidate scorers, and the search methods
(Random Search, successive halving, aging evolution, TPE, DASS) under one FLOP budget."""

from sparsearch.search import dass, evolution, halving, tpe  # noqa: F401  (register the search methods)
from sparsearch.search.allocation import AllocationSpace, can_mutate, mutate
from sparsearch.search.methods import (
    SEARCH_METHODS,
    AskTellMethod,
    Candidate,
    Evaluation,
    SearchMethod,
    SearchOutcome,
    SearchProblem,
    built_in_order,
    check_method_fits,
    random_search_flops,
    run_method,
)
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
    "SEARCH_METHODS",
    "SPACES",
    "AllocationSpace",
    "AskTellMethod",
    "Candidate",
    "Evaluation",
    "NodeSpace",
    "Score",
    "Scorer",
    "ScoringContext",
    "SearchMethod",
    "SearchOutcome",
    "SearchProblem",
    "SearchResult",
    "SearchSpace",
    "UnitAnalysis",
    "UnitGroup",
    "UnitSlot",
    "WeightSpace",
    "built_in_order",
    "can_mutate",
    "check_method_fits",
    "check_scorer",
    "find_unit_groups",
    "make_space",
    "mutate",
    "node_sparsity",
    "random_search",
    "random_search_flops",
    "rescale_to_fan_in",
    "run_method",
    "short_train_evaluation",
    "short_train_score",
    "snip_score",
    "synflow_score",
    "weight_sparsity",
]
