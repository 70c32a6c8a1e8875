"""The per-layer pruning rules: magnitude, Wanda, SparseGPT and DSnoT, on one weight matrix at a time.

Every function takes the weight as ``[out_features, in_features]`` (GPT-2's Conv1D is transposed by the
caller) together with the statistics of that layer's inputs over the calibration tokens, and returns the
pruned weight and its mask (``True`` = kept). Nothing here knows about models or blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsearch.oneshot.config import Budget, OneShotConfig


@dataclass
class InputStatistics:
    """Sums over the calibration tokens of one layer's input x: the Gram matrix sum(x x^T) and sum(x)."""

    in_features: int
    device: torch.device | str = "cpu"
    hessian: Tensor = field(init=False)
    feature_sum: Tensor = field(init=False)
    tokens: int = 0
    sequences: int = 0

    def __post_init__(self) -> None:
        self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        self.feature_sum = torch.zeros(self.in_features, dtype=torch.float64, device=self.device)

    def update(self, inputs: Tensor) -> None:
        """Add a batch of inputs (any leading shape, last dimension = in_features)."""
        flat = inputs.detach().reshape(-1, self.in_features).float()
        self.hessian.addmm_(flat.T, flat)
        self.feature_sum += flat.sum(0, dtype=torch.float64)
        self.tokens += flat.shape[0]
        self.sequences += inputs.shape[0] if inputs.ndim >= 3 else 1

    @property
    def column_norms(self) -> Tensor:
        """||X_j||_2 over the calibration tokens, per input feature (Wanda's activation norm)."""
        return self.hessian.diagonal().clamp_min(0).sqrt()

    @property
    def sequence_sum(self) -> Tensor:
        """Sum of x over the tokens of one calibration sequence, averaged over sequences (DSnoT's statistic)."""
        return (self.feature_sum / max(self.sequences, 1)).float()

    @property
    def variance(self) -> Tensor:
        second_moment = self.hessian.diagonal().double() / max(self.tokens, 1)
        return (second_moment - (self.feature_sum / max(self.tokens, 1)) ** 2).clamp_min(0).float()


def check_group_size(in_features: int, n_m: tuple[int, int] | None, layer_name: str) -> None:
    """Raise if an N:M pattern cannot tile the layer's input dimension."""
    if n_m is not None and in_features % n_m[1] != 0:
        raise ValueError(
            f"pattern {n_m[0]}:{n_m[1]} does not divide layer {layer_name!r}: its input dimension "
            f"{in_features} is not a multiple of M={n_m[1]}; choose an M that divides {in_features}"
        )


def _pruned_count(total: int, sparsity: float) -> int:
    return min(total, round(total * sparsity))


def lowest_score_mask(score: Tensor, sparsity: float, budget: Budget, n_m: tuple[int, int] | None) -> Tensor:
    """Keep-mask that removes the lowest scores: N:M per group, else ``sparsity`` per row or per layer."""
    rows, cols = score.shape
    if n_m is not None:
        kept, group = n_m
        grouped = score.reshape(rows, cols // group, group)
        keep = torch.zeros_like(grouped, dtype=torch.bool)
        keep.scatter_(2, grouped.topk(kept, dim=2).indices, True)
        return keep.reshape(rows, cols)
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if budget == "row":
        pruned = _pruned_count(cols, sparsity)
        if pruned:
            keep.scatter_(1, score.topk(pruned, dim=1, largest=False).indices, False)
        return keep
    pruned = _pruned_count(score.numel(), sparsity)
    if pruned:
        keep.view(-1)[score.flatten().topk(pruned, largest=False).indices] = False
    return keep


def magnitude_score(weight: Tensor) -> Tensor:
    return weight.abs()


def wanda_score(weight: Tensor, statistics: InputStatistics) -> Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al. 2023)."""
    return weight.abs() * statistics.column_norms.unsqueeze(0)


def _inverse_hessian_cholesky(hessian: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = dampening * mean(diag H), as in SparseGPT."""
    hessian = hessian.double()
    diagonal = hessian.diagonal()
    damp = dampening * diagonal.mean().clamp_min(1e-12)
    regularised = hessian + damp * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    lower = torch.linalg.cholesky(regularised)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float()


def sparsegpt(weight: Tensor, statistics: InputStatistics, config: OneShotConfig) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune column blocks with adaptive masks and OBS weight updates.

    Within each block of ``sparsegpt_block_size`` columns the mask keeps the largest w^2 / [H^-1]_jj^2
    (over the whole block for a "layer" budget, per row for a "row" budget; for N:M, per group of M columns
    when the group starts); each column is then pruned and its error spread over the remaining columns.
    """
    n_m = config.n_m
    sparsity = config.target_sparsity
    budget = config.effective_budget
    work = weight.detach().float().clone()
    cols = work.shape[1]
    hessian = statistics.hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    work[:, dead] = 0
    inverse = _inverse_hessian_cholesky(hessian, config.sparsegpt_dampening)
    keep = torch.ones_like(work, dtype=torch.bool)
    block_size = config.sparsegpt_block_size
    if n_m is not None:
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[:, start:end].clone()
        block_inverse = inverse[start:end, start:end]
        block_errors = torch.zeros_like(block)
        inverse_diagonal = block_inverse.diagonal()
        if n_m is None:
            saliency = block**2 / inverse_diagonal.unsqueeze(0) ** 2
            block_keep = lowest_score_mask(saliency, sparsity, budget, None)
        else:
            block_keep = torch.ones_like(block, dtype=torch.bool)
        for column in range(end - start):
            if n_m is not None and column % n_m[1] == 0:
                group = slice(column, column + n_m[1])
                saliency = block[:, group] ** 2 / inverse_diagonal[group].unsqueeze(0) ** 2
                block_keep[:, group] = lowest_score_mask(saliency, 0.0, "row", n_m)
            values = block[:, column]
            quantised = values * block_keep[:, column]
            error = (values - quantised) / block_inverse[column, column]
            block[:, column:] -= error.unsqueeze(1) * block_inverse[column, column:].unsqueeze(0)
            block[:, column] = quantised
            block_errors[:, column] = error
        work[:, start:end] = block
        keep[:, start:end] = block_keep
        work[:, end:] -= block_errors @ inverse[start:end, end:]
    keep &= ~dead.unsqueeze(0)
    return work * keep, keep


def dsnot(
    dense: Tensor, pruned: Tensor, keep: Tensor, statistics: InputStatistics, config: OneShotConfig
) -> tuple[Tensor, Tensor, int]:
    """DSnoT (Zhang et al. 2024): training-free prune-and-grow swaps that shrink each row's output error.

    Per row, e = sum_j (W_j - W'_j) S_j is the error of the output summed over a calibration sequence
    (S_j = sum of x_j over one sequence's tokens, averaged over sequences, as in the reference code, so the
    0.1 threshold means what it means there). A cycle restores one pruned weight j that moves e toward 0
    (the largest sign(e) W_j S_j / Var(x_j)^p) and prunes one kept weight k that also moves e toward 0
    (sign(e) W'_k S_k < 0) with the lowest Wanda score; for N:M, k is the kept weight with the lowest Wanda
    score in j's group so the pattern holds. Rows stop when |e| is below
    the threshold, when candidates run out, or after ``dsnot_max_cycles`` cycles.

    *Choice* (not in the paper): a swap is applied only if it lowers the row's exact reconstruction error
    ||(W - W') X||^2 on the calibration tokens, computed from the Gram matrix already collected, so DSnoT
    can never make a layer worse on its own objective. Kept weights keep their values (SparseGPT's update
    survives); a restored weight takes its dense value. Returns (weight, keep-mask, swaps applied).
    """
    dense64 = dense.detach().double()
    current = pruned.detach().double().clone()
    keep = keep.clone()
    hessian = statistics.hessian.double()
    mean = statistics.sequence_sum.double()
    norms = statistics.column_norms.float()
    # Candidate selection only ranks, so it runs in float32; the error bookkeeping stays in float64.
    grow_base = (dense64 * mean / (statistics.variance.double() + 1e-12) ** config.dsnot_variance_power).float()
    mean32 = mean.float()
    difference = dense64 - current
    gram_difference = difference @ hessian
    error = difference @ mean
    touched = torch.zeros_like(keep)
    column_group = (
        torch.arange(dense64.shape[1], device=dense64.device) // config.n_m[1] if config.n_m is not None else None
    )
    active = (error.abs() > config.dsnot_threshold).nonzero().squeeze(1)
    swaps = 0
    for _ in range(config.dsnot_max_cycles):
        if active.numel() == 0:
            break
        direction = torch.sign(error[active]).float().unsqueeze(1)
        untouched_kept, untouched_pruned = keep[active] & ~touched[active], ~keep[active] & ~touched[active]
        grow_score = direction * grow_base[active]
        grow_allowed = untouched_pruned & (grow_score > 0)
        grow = grow_score.masked_fill_(~grow_allowed, -math.inf).argmax(1)
        current_rows = current[active].float()
        if column_group is not None:
            prune_allowed = untouched_kept & (column_group.unsqueeze(0) == column_group[grow].unsqueeze(1))
        else:
            prune_allowed = untouched_kept & (direction * current_rows * mean32 < 0)
        prune = (current_rows.abs() * norms).masked_fill_(~prune_allowed, math.inf).argmin(1)
        stepping = grow_allowed.any(1) & prune_allowed.any(1)
        restore = -difference[active, grow]
        removed = current[active, prune]
        change = (
            2 * restore * gram_difference[active, grow]
            + restore**2 * hessian[grow, grow]
            + 2 * removed * gram_difference[active, prune]
            + removed**2 * hessian[prune, prune]
            + 2 * restore * removed * hessian[grow, prune]
        )
        accepted = stepping & (change < 0)
        touched[active[stepping], grow[stepping]] = True
        touched[active[stepping], prune[stepping]] = True
        rows, grown, pruned_now = active[accepted], grow[accepted], prune[accepted]
        current[rows, grown] = dense64[rows, grown]
        current[rows, pruned_now] = 0
        keep[rows, grown] = True
        keep[rows, pruned_now] = False
        difference[rows, grown] = 0
        difference[rows, pruned_now] = dense64[rows, pruned_now]
        restore, removed = restore[accepted].unsqueeze(1), removed[accepted].unsqueeze(1)
        gram_difference[rows] += restore * hessian[grown] + removed * hessian[pruned_now]
        error[rows] += restore.squeeze(1) * mean[grown] + removed.squeeze(1) * mean[pruned_now]
        swaps += int(accepted.sum())
        active = active[stepping & (error[active].abs() > config.dsnot_threshold)]
    return current.to(pruned.dtype), keep, swaps


def relative_reconstruction_error(dense: Tensor, pruned: Tensor, statistics: InputStatistics) -> float:
    """||W X - W' X||^2 / ||W X||^2 over the calibration inputs X, from the Gram matrix sum(x x^T)."""
    hessian = statistics.hessian.double()
    dense64 = dense.detach().double()
    difference = dense64 - pruned.detach().double()
    numerator = ((difference @ hessian) * difference).sum()
    denominator = ((dense64 @ hessian) * dense64).sum()
    return float(numerator / denominator) if denominator > 0 else 0.0


def prune_weight(weight: Tensor, statistics: InputStatistics, config: OneShotConfig) -> tuple[Tensor, Tensor, int]:
    """Apply the configured method (and DSnoT on top if asked) to one weight: (weight, keep-mask, swaps)."""
    dense = weight.detach().float().contiguous()
    if config.method == "sparsegpt":
        pruned, keep = sparsegpt(dense, statistics, config)
    else:
        score = magnitude_score(dense) if config.method == "magnitude" else wanda_score(dense, statistics)
        keep = lowest_score_mask(score, config.target_sparsity, config.effective_budget, config.n_m)
        pruned = dense * keep
    swaps = 0
    if config.dsnot:
        pruned, keep, swaps = dsnot(dense, pruned, keep, statistics, config)
    return pruned, keep, swaps
