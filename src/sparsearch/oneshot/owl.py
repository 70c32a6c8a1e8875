"""Outlier-weighted layer-wise sparsity (OWL, Yin et al. 2024, arXiv 2310.05175): which block to prune less.

OWL measures, in every transformer block of the dense model, the share of "outliers": weights whose Wanda
score |W_ij| * ||X_j||_2 exceeds ``m`` times the mean score of that block (all its Linear layers together,
as in the reference code). Blocks with more outliers keep more weights. The ratios are mapped linearly onto a
band: the block with the fewest outliers gets the highest sparsity, the one with the most the lowest, the
spread between them is ``2 * lambda`` and the (parameter-weighted) mean is the global target, so the model's
overall sparsity is unchanged. *Choice*: the paper bounds every block to [target - lambda, target + lambda];
the reference code's mapping (spread 2 lambda, mean = target) can leave that band when the ratios are skewed,
so deviations are then shrunk, all by the same factor, until the farthest one is exactly lambda.

Only the arithmetic lives here; ``sequential.prune_model`` runs the dense calibration pass that feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def check_owl_settings(target: float, m: float, band: float) -> None:
    """Raise if OWL's outlier threshold ``m`` or band ``lambda`` cannot work at the ``target`` sparsity."""
    if not m > 0:
        raise ValueError(f"OWL's outlier threshold M={m} must be > 0 (outliers score above M times the mean)")
    if not band >= 0:
        raise ValueError(f"OWL's band lambda={band} must be >= 0")
    if target - band < 0 or target + band >= 1:
        raise ValueError(
            f"OWL's band lambda={band} around sparsity {target:g} gives layer sparsities in "
            f"[{target - band:g}, {target + band:g}], outside [0, 1); use lambda <= "
            f"{min(target, 1 - target):g} minus a little at this sparsity"
        )


def outlier_ratio(scores: Iterable[Tensor], m: float) -> float:
    """Share of entries, over all ``scores`` taken together, that exceed ``m`` times their common mean."""
    flat = torch.cat([score.detach().reshape(-1).float() for score in scores])
    if flat.numel() == 0:
        raise ValueError("outlier ratio of no scores: the block has no prunable weights")
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(
    ratios: Sequence[float], target: float, band: float, sizes: Sequence[int] | None = None
) -> list[float]:
    """Per-block sparsities from outlier ``ratios``: more outliers, lower sparsity.

    The size-weighted mean (``sizes``: prunable weights per block; equal if omitted) is ``target``, no block
    is farther than ``band`` from it, and the sparsities are a decreasing affine function of the ratios.
    """
    if len(ratios) == 0:
        raise ValueError("OWL needs at least one block")
    sizes = [1] * len(ratios) if sizes is None else list(sizes)
    if len(sizes) != len(ratios) or any(size <= 0 for size in sizes):
        raise ValueError(f"OWL needs one positive size per block, got sizes {sizes} for {len(ratios)} blocks")
    weights = torch.tensor(sizes, dtype=torch.float64)
    values = torch.tensor(list(ratios), dtype=torch.float64)
    spread = values.max() - values.min()
    if spread <= 0:
        return [target] * len(ratios)
    scaled = (values - values.min()) / spread * 2 * band
    deviation = scaled - (scaled * weights).sum() / weights.sum()
    farthest = float(deviation.abs().max())
    if farthest > band:
        deviation *= band / farthest
    return [float(target - value) for value in deviation]
