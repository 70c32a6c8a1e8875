"""Building masks with exact non-zero counts from scores: per layer top-k, global top-k, random."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape keeping exactly the ``keep`` highest-scoring entries."""
    numel = scores.numel()
    if not 0 <= keep <= numel:
        raise ValueError(f"keep must be in [0, {numel}] for a tensor of shape {tuple(scores.shape)}, got {keep}")
    flat = scores.detach().reshape(-1).float()
    if keep == 0 or keep == numel:
        return torch.full_like(flat, keep == numel, dtype=torch.bool).view_as(scores)
    # The result equals a stable descending sort's first `keep` entries (NaN first, ties by position), in O(n):
    # the keep-th largest value does not depend on the top-k implementation, and ties at it go by position.
    nan = torch.isnan(flat)
    nan_count = int(nan.count_nonzero())
    if nan_count >= keep:
        return (nan & (torch.cumsum(nan, 0) <= keep)).view_as(scores)
    rest = keep - nan_count
    finite = flat.masked_fill(nan, -math.inf)
    threshold = torch.topk(finite, rest, sorted=False).values.min()
    above = (finite > threshold) & ~nan
    ties = (finite == threshold) & ~nan
    mask = nan | above | (ties & (torch.cumsum(ties, 0) <= rest - int(above.count_nonzero())))
    return mask.view_as(scores)


def random_mask(shape: torch.Size | tuple[int, ...], keep: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask keeping exactly ``keep`` positions chosen uniformly at random."""
    numel = int(torch.Size(shape).numel())
    if not 0 <= keep <= numel:
        raise ValueError(f"keep must be in [0, {numel}] for shape {tuple(shape)}, got {keep}")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:keep]] = True
    return mask.view(shape)


def global_topk_masks(scores: Mapping[str, torch.Tensor], total_keep: int) -> dict[str, torch.Tensor]:
    """Masks keeping the ``total_keep`` highest scores across all layers together (global pruning)."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    joint = topk_mask(flat, total_keep)
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = joint[start : start + score.numel()].view_as(score).to(score.device)
        start += score.numel()
    return masks


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of zeros over all masks together."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.count_nonzero()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0
