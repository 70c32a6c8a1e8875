"""TPE (Optuna's Tree-structured Parzen Estimator) over the layer-wise allocation space.

Each trial suggests one log-factor per layer in ``[-log(spread), log(spread)]``; the allocation space turns
them into kept-weight counts with the global budget fixed (``AllocationSpace.counts_from_logits``), so every
proposal has exactly the space's sparsity. Positions within a layer come from one set of random scores per
search (top-k of the same scores for every trial), so two trials differ only in their allocation and TPE
compares allocations, not position draws. The first trial is the base distribution itself (all factors 1:
ERK by default), a known good point to start from; then ``n_startup`` random trials, then TPE proper
(multivariate, constant liar so that a batch of parallel trials does not repeat itself).

Candidates are scored at half of Random Search's short-training length by default (about twice as many
trials for the same budget). Optuna is imported when the method is built (an optional heavy dependency).
"""

from __future__ import annotations

from typing import Any

import torch

from sparsearch.search.allocation import AllocationSpace
from sparsearch.search.methods import SEARCH_METHODS, AskTellMethod, Candidate, Evaluation, SearchProblem

FIDELITY_FRACTION = 0.5
LOSS_TIEBREAK = 1e-3  # objective = accuracy - 1e-3 * loss: ranks equal accuracies by loss, never reorders others


@SEARCH_METHODS.register("tpe")
class TPESearch(AskTellMethod):
    """TPE over per-layer allocations (see the module doc).

    Args:
        problem: the search problem; its space must be an :class:`AllocationSpace`.
        budget_flops: the search budget; trials run until the next would exceed it.
        steps: short-training steps per trial (default: half the problem's).
        n_startup: random trials before TPE models the results (default: a third of the affordable trials).
        batch: trials asked at once (evaluated in parallel).
    """

    name = "tpe"
    spaces = ("allocation",)

    def __init__(
        self,
        problem: SearchProblem,
        budget_flops: int,
        *,
        steps: int | None = None,
        n_startup: int | None = None,
        batch: int = 1,
    ) -> None:
        super().__init__(problem, budget_flops)
        if not isinstance(problem.space, AllocationSpace):
            raise ValueError(
                f"search method 'tpe' does not fit {type(problem.space).__name__}; 'tpe' searches: allocation"
            )
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space: AllocationSpace = problem.space
        self.steps = steps or max(1, round(FIDELITY_FRACTION * problem.short_train_steps))
        self.batch = batch
        generator = torch.Generator().manual_seed(problem.seed)
        self.position_scores = self.space.position_scores(generator)
        reference = self.space.masks_for_counts(
            self.space.counts_from_logits(dict.fromkeys(self.space.layers, 0.0)), self.position_scores
        )
        affordable = budget_flops // max(1, problem.evaluation_flops(Candidate(-1, reference, self.steps)))
        self.n_startup = n_startup if n_startup is not None else max(2, int(affordable) // 3)
        sampler = optuna.samplers.TPESampler(
            seed=problem.seed % 2**32, n_startup_trials=self.n_startup, multivariate=True, constant_liar=True
        )
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.study.enqueue_trial({self._parameter(i): 0.0 for i in range(len(self.space.layers))})
        self.trials: dict[int, Any] = {}
        self.logits: dict[int, dict[str, float]] = {}

    @staticmethod
    def _parameter(index: int) -> str:
        return f"layer{index}"

    def ask(self) -> list[Candidate]:
        batch = []
        bound = self.space.log_spread
        for _ in range(self.batch):
            trial = self.study.ask()
            logits = {
                name: trial.suggest_float(self._parameter(index), -bound, bound)
                for index, name in enumerate(self.space.layers)
            }
            masks = self.space.masks_for_counts(self.space.counts_from_logits(logits), self.position_scores)
            candidate = self.new_candidate(masks, self.steps)
            self.trials[candidate.id] = trial
            self.logits[candidate.id] = logits
            batch.append(candidate)
        return batch

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        super().tell(candidate, evaluation)
        value = evaluation.score - LOSS_TIEBREAK * min(evaluation.loss, 100.0)
        if value != value:  # NaN (a diverged candidate): the worst possible value, not a failed trial
            value = -1.0
        self.study.tell(self.trials.pop(candidate.id), value)
