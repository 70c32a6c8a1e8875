"""Successive halving over short-training length: many candidates briefly, the best half twice as long, ...

Rung ``r`` trains its candidates to ``top_steps / eta**(R - r)`` steps; the best ``1/eta`` of a rung (by
validation accuracy, then loss) continue to the next rung from where they stopped (their model and optimizer
state), so a promotion costs only the extra steps. The number of rungs and of first-rung candidates are chosen
from the budget: as many candidates as the budget allows, with at least two candidates in the last rung (a rung
of one would spend budget without choosing anything). The winner is the best of the highest finished rung.

Own implementation rather than Optuna's ``SuccessiveHalvingPruner``: the pruner decides per trial while it
runs (asynchronous SH), which needs a running trial per candidate and cannot hand the whole rung to a pool at
once or size the first rung from a FLOP budget; synchronous SH in ask/tell form is thirty lines.
"""

from __future__ import annotations

import math

import torch

from sparsearch.search.methods import (
    SEARCH_METHODS,
    AskTellMethod,
    Candidate,
    Evaluation,
    SearchProblem,
    rank_key,
)

DEFAULT_ETA = 2
TOP_STEPS_FACTOR = 2  # the last rung trains this many times Random Search's short-training length
MAX_RUNGS = 4


@SEARCH_METHODS.register("sh")
class SuccessiveHalving(AskTellMethod):
    """Synchronous successive halving over short-training steps (see the module doc).

    Args:
        problem: the search problem (scorer must be "short-train": the fidelity is the training length).
        budget_flops: the search budget.
        eta: keep the best ``1/eta`` of every rung; each rung trains ``eta`` times longer.
        top_steps: training steps of the last rung (default: 2 x the problem's short-training steps).
    """

    name = "sh"
    scorers = ("short-train",)

    def __init__(
        self, problem: SearchProblem, budget_flops: int, *, eta: int = DEFAULT_ETA, top_steps: int | None = None
    ) -> None:
        super().__init__(problem, budget_flops)
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
            raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
        self.eta = eta
        self.top_steps = top_steps or TOP_STEPS_FACTOR * problem.short_train_steps
        self.sampler = torch.Generator().manual_seed(problem.seed)
        reference = problem.space.sample(torch.Generator().manual_seed(problem.seed))
        nonzero, _ = problem.forward_flops(reference)
        self.step_flops = problem.step_samples * 3 * nonzero
        self.validation_flops = len(problem.data.y_val) * nonzero
        self.rung_steps, self.rung_sizes = self._plan()
        self.rung = -1
        self.results: list[list[Evaluation]] = []
        self._pending: dict[int, Candidate] = {}

    def plan_flops(self, rung_steps: list[int], rung_sizes: list[int]) -> int:
        """Predicted cost of a plan: every rung's extra steps and one validation pass per candidate and rung."""
        total, previous = 0, 0
        for steps, size in zip(rung_steps, rung_sizes, strict=True):
            total += size * ((steps - previous) * self.step_flops + self.validation_flops)
            previous = steps
        return total

    def _plan(self) -> tuple[list[int], list[int]]:
        """The most rungs (up to MAX_RUNGS) whose last rung still holds two candidates, each rung as full as
        the budget allows; one rung (plain Random Search at ``top_steps``) if no such plan fits."""
        for rungs in range(MAX_RUNGS, 0, -1):
            steps = [max(1, math.ceil(self.top_steps / self.eta ** (rungs - 1 - r))) for r in range(rungs)]
            first = 0
            while self.plan_flops(steps, self._sizes(first + 1, rungs)) <= self.budget_flops:
                first += 1
            sizes = self._sizes(first, rungs)
            if first >= 1 and (rungs == 1 or sizes[-1] >= 2):
                return steps, sizes
        return [self.top_steps], [1]

    def _sizes(self, first: int, rungs: int) -> list[int]:
        return [max(1, first // self.eta**r) for r in range(rungs)]

    def ask(self) -> list[Candidate]:
        if self._pending:
            return []  # a rung is being evaluated
        next_rung = self.rung + 1
        if next_rung >= len(self.rung_steps):
            return []
        steps = self.rung_steps[next_rung]
        if next_rung == 0:
            batch = [
                self.new_candidate(self.problem.space.sample(self.sampler), steps) for _ in range(self.rung_sizes[0])
            ]
        else:
            ranked = sorted(self.results[-1], key=rank_key, reverse=True)[: self.rung_sizes[next_rung]]
            ranked.sort(key=lambda evaluation: evaluation.candidate_id)
            batch = [
                Candidate(evaluation.candidate_id, self.masks[evaluation.candidate_id], steps, evaluation.state)
                for evaluation in ranked
            ]
        self.rung = next_rung
        self.results.append([])
        self._pending = {candidate.id: candidate for candidate in batch}
        return batch

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        super().tell(candidate, evaluation)
        self.results[self.rung].append(evaluation)
        self._pending.pop(candidate.id, None)

    def best(self) -> Evaluation:
        finished = [results for results in self.results if results and len(results) == self._rung_size(results)]
        if not finished:
            return super().best()
        return max(sorted(finished[-1], key=lambda e: e.candidate_id), key=rank_key)

    def _rung_size(self, results: list[Evaluation]) -> int:
        return self.rung_sizes[self.results.index(results)]
