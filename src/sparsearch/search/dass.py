"""DASS-style differentiable search: learn the mask on the parent by gradient under the sparsity budget.

Every masked weight ``w`` gets a score ``s``; the forward pass uses ``w * m`` with ``m`` the hard mask that
keeps the highest scores under the space's budget (per-layer counts in the weight space; the global count in
the allocation space, at least one weight per layer), and the backward pass treats ``m`` as if it were ``s``
(straight-through: ``dL/ds = dL/d(w m) * w``), so a pruned connection whose weight would lower the loss gains
score and can come back. Weights train with the study's optimizer at the kept positions, scores with Adam.
Scores start at ``|w|`` divided by the layer's k-th largest ``|w|`` (k = the base allocation's count), so the
first hard mask is magnitude pruning at the base allocation and all layers start on one scale.

The result is a mask only: the study trains it from the parent's initialisation like every other arm.

Cost per step, charged to the budget before it is taken: the forward and input-gradient passes with the kept
weights, and the weight/score-gradient pass dense (every score needs its gradient), i.e.
``batch * (2 * non-zero + dense)`` forward FLOPs per sample; one validation pass at the end.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.search.allocation import AllocationSpace
from sparsearch.search.methods import SEARCH_METHODS, EvaluateMany, SearchMethod, SearchOutcome, SearchProblem
from sparsearch.search.spaces import WeightSpace
from sparsearch.sparsity.masks import topk_mask
from sparsearch.training import batch_order, deterministic_algorithms, evaluate, make_optimizer

SCORE_LR = 0.02


def hard_masks(scores: dict[str, Tensor], space: WeightSpace | AllocationSpace) -> dict[str, Tensor]:
    """The masks the space allows that keep the highest scores (exact per-layer or global count)."""
    if isinstance(space, WeightSpace):
        return {name: topk_mask(score, space.keep_counts[name]) for name, score in scores.items()}
    # global top-k with every layer's best weight reserved, so no layer is cut off entirely
    flat = torch.cat([score.detach().reshape(-1) for score in scores.values()]).clone()
    start = 0
    for score in scores.values():
        flat[start + int(score.detach().reshape(-1).argmax())] = float("inf")
        start += score.numel()
    joint = topk_mask(flat, space.total_keep)
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = joint[start : start + score.numel()].view_as(score)
        start += score.numel()
    return masks


@SEARCH_METHODS.register("dass")
class DASS(SearchMethod):
    """Differentiable mask search with a straight-through hard mask (see the module doc).

    Args:
        problem: the search problem; its space must be a weight or an allocation space.
        budget_flops: the search budget; training steps run until the next would exceed it.
        score_lr: Adam learning rate of the scores (they start on a scale of 1 at the pruning threshold).
    """

    name = "dass"
    spaces = ("weight", "allocation")

    def __init__(self, problem: SearchProblem, budget_flops: int, *, score_lr: float = SCORE_LR) -> None:
        super().__init__(problem, budget_flops)
        if not isinstance(problem.space, WeightSpace | AllocationSpace):
            raise ValueError(
                f"search method 'dass' does not fit {type(problem.space).__name__}; 'dass' searches: weight, allocation"
            )
        self.space = problem.space
        self.score_lr = score_lr

    def initial_scores(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """``|w|`` over the layer's k-th largest ``|w|`` (k: the space's base count): magnitude pruning at the
        base allocation, every layer on one scale."""
        if isinstance(self.space, WeightSpace):
            base = dict(self.space.keep_counts)
        else:
            base = self.space.counts_from_logits(dict.fromkeys(self.space.layers, 0.0))
        scores = {}
        for name, weight in weights.items():
            magnitude = weight.detach().abs()
            threshold = magnitude.reshape(-1).kthvalue(max(1, magnitude.numel() - base[name] + 1)).values
            scores[name] = magnitude / threshold.clamp(min=1e-12)
        return scores

    def run(self, evaluate_many: EvaluateMany | None = None) -> SearchOutcome:
        started = time.perf_counter()
        problem = self.problem
        model = problem.model_factory()
        weights = default_sparsifiable_parameters(model)
        scores = {name: score.requires_grad_() for name, score in self.initial_scores(weights).items()}
        weight_optimizer = make_optimizer(model, problem.train_budget)
        score_optimizer = torch.optim.Adam(scores.values(), lr=self.score_lr)
        generator = torch.Generator().manual_seed(problem.seed)
        _, dense = problem.forward_flops(None)
        spent, steps, stopped = 0, 0, False
        masks = hard_masks(scores, self.space)
        torch.manual_seed(problem.seed)
        model.train()
        with deterministic_algorithms():
            while not stopped:
                for indices in batch_order(len(problem.data.y_train), problem.batch_size, generator):
                    nonzero, _ = problem.forward_flops(masks)
                    # one step, then the validation pass that ends the search, must still fit
                    step_cost = len(indices) * (2 * nonzero + dense)
                    if spent + step_cost + len(problem.data.y_val) * nonzero > self.budget_flops:
                        stopped = True
                        break
                    effective = {
                        name: weights[name] * (masks[name] + scores[name] - scores[name].detach()) for name in weights
                    }
                    logits = functional_call(model, effective, (problem.data.x_train[indices],))
                    loss = F.cross_entropy(logits, problem.data.y_train[indices])
                    weight_optimizer.zero_grad(set_to_none=True)
                    score_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    weight_optimizer.step()
                    score_optimizer.step()
                    spent += step_cost
                    steps += 1
                    masks = hard_masks(scores, self.space)
            with torch.no_grad():
                for name, weight in weights.items():
                    weight.mul_(masks[name])
            nonzero, _ = problem.forward_flops(masks)
            spent += len(problem.data.y_val) * nonzero
            accuracy, loss_value = evaluate(model, problem.data.x_val, problem.data.y_val)
        if steps == 0:
            raise RuntimeError(
                f"search method 'dass' could not take one step within the budget of {self.budget_flops} FLOPs"
            )
        final = {name: mask.detach().clone() for name, mask in masks.items()}
        return SearchOutcome(
            method=self.name,
            best_masks=final,
            best_id=0,
            best_score=float(accuracy),
            budget_flops=self.budget_flops,
            flops=int(spent),
            seconds=time.perf_counter() - started,
            evaluations=[
                {"id": 0, "steps": steps, "score": float(accuracy), "loss": float(loss_value), "flops": int(spent)}
            ],
            stopped_by_budget=True,
        )
