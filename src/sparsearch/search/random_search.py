"""Random Search over a search space: sample N candidates, score each, keep the best.

Candidate ``i`` is the ``i``-th sample of ``space.sample(torch.Generator().manual_seed(seed))``; the
"random counterpart" of a search is one unscored sample from the same space at the same sparsity (note: a
counterpart drawn with the same seed IS candidate 0). Every candidate is scored on a fresh model from
``model_factory`` (pass a factory that builds the parent with the study seed, so that the winner is scored
with the initialisation it will be trained from). Short-train ties (same validation accuracy) go to the lower
validation loss; remaining ties keep the earliest candidate; a NaN score ranks last.

Cost (benchmarks/results/training_speed.md): SynFlow and SNIP take ~5-30 ms per candidate; short-train takes
n_candidates x k optimizer steps, so keep n_candidates * k below epochs * steps_per_epoch for the search to
cost less than one full training (8 x 40 steps: ~1.4 s for MLP (256, 256), ~5-6 s for (512, 512, 256)).
``SearchResult.flops`` counts that cost with the training loop's FLOP meter (a training step is 3 forward
passes of the candidate's non-zero weights, except that the weight gradients of SNIP and SynFlow are dense), so
a study can add it to the searched arm's training FLOPs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparsearch.data.splits import DataSplits
from sparsearch.models.flops import FlopMeter, weight_positions
from sparsearch.search.scorers import SCORERS, ScoringContext
from sparsearch.search.spaces import SearchSpace, rescale_to_fan_in
from sparsearch.training import TrainBudget


@dataclass
class SearchResult:
    """The winning candidate's masks, every candidate's score (in sampling order) and the search time."""

    best_masks: dict[str, Tensor]
    scores: list[float]
    best_index: int
    seconds: float
    val_losses: list[float] | None = None  # scorers that report one (short-train): every candidate's, the tie-break
    flops: int = 0  # floating-point operations spent scoring all candidates


def check_scorer(scorer: str) -> str:
    """Return ``scorer`` if it is registered in ``SCORERS``, else raise a ValueError naming the allowed ones."""
    SCORERS.get(scorer)
    return scorer


def random_search(
    space: SearchSpace,
    model_factory: Callable[[], nn.Module],
    data: DataSplits,
    *,
    scorer: str,
    n_candidates: int,
    seed: int,
    short_train_steps: int = 50,
    batch_size: int = 128,
    budget: TrainBudget | None = None,
    rescale_init: bool = False,
) -> SearchResult:
    """Score ``n_candidates`` random samples of ``space`` with ``scorer`` and return the best.

    Args:
        space: a ``NodeSpace`` or ``WeightSpace`` (anything with ``sample(generator)``).
        model_factory: builds a fresh parent model (same seed every call, normally).
        data: splits; SNIP uses one training batch, short-train trains on train and judges on validation.
        scorer: a name in ``SCORERS``: "synflow", "snip", "short-train" or one you registered.
        n_candidates: number of candidates sampled and scored (>= 1).
        seed: seeds the candidate sampler, the SNIP batch and the short-train batch order.
        short_train_steps: optimizer steps per candidate for "short-train".
        batch_size: batch size of the SNIP batch and of short-train.
        budget: optimizer settings for short-train (its learning rate is used constant); default TrainBudget().
        rescale_init: apply ``rescale_to_fan_in`` to every candidate before scoring; pass True exactly when
            the trained arms get the same sparsity-aware initialisation, so candidates are scored as trained.
    """
    score_candidate = SCORERS.get(scorer)
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(short_train_steps, bool) or not isinstance(short_train_steps, int) or short_train_steps < 1:
        raise ValueError(f"short_train_steps must be a positive integer, got {short_train_steps!r}")
    started = time.perf_counter()
    sampler = torch.Generator().manual_seed(seed)
    batch_indices = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:batch_size]
    batch = (data.x_train[batch_indices], data.y_train[batch_indices])
    scores: list[float] = []
    val_losses: list[float | None] = []
    best_masks: dict[str, Tensor] = {}
    best_key: tuple[float, float] | None = None
    best_index = -1
    flops = 0
    positions: dict[str, int] | None = None
    for index in range(n_candidates):
        masks = space.sample(sampler)
        model = model_factory()
        if rescale_init:
            rescale_to_fan_in(model, masks)
        positions = positions or weight_positions(model, data.input_shape)
        context = ScoringContext(
            data=data,
            budget=budget or TrainBudget(),
            seed=seed,
            batch_size=batch_size,
            short_train_steps=short_train_steps,
            batch=batch,
            flop_meter=FlopMeter(model, data.input_shape, positions),
        )
        score = score_candidate(model, masks, context)
        flops += score.flops
        scores.append(score.value)
        val_losses.append(score.val_loss)
        tiebreak = score.tiebreak
        key = (
            (-math.inf, -math.inf)
            if math.isnan(score.value)
            else (score.value, -math.inf if math.isnan(tiebreak) else tiebreak)
        )
        if best_key is None or key > best_key:
            best_key, best_index, best_masks = key, index, masks
    return SearchResult(
        best_masks=best_masks,
        scores=scores,
        best_index=best_index,
        seconds=time.perf_counter() - started,
        val_losses=None if None in val_losses else [float(loss) for loss in val_losses if loss is not None],
        flops=flops,
    )
