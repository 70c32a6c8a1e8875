"""The vocabulary of sparsity: layer-wise distributions, mask construction, structures, scores, schedules."""

from sparsearch.sparsity.schedules import Constant, Cosine, Cubic, Exponential, Linear, Schedule, as_schedule
from sparsearch.sparsity.structures import NM, Block, Channel, Structure, Unstructured, parse_structure

__all__ = [
    "NM",
    "Block",
    "Channel",
    "Constant",
    "Cosine",
    "Cubic",
    "Exponential",
    "Linear",
    "Schedule",
    "Structure",
    "Unstructured",
    "as_schedule",
    "parse_structure",
]
