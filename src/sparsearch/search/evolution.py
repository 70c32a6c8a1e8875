"""Regularised (aging) evolution (Real et al. 2019) with mutations fitted to each search space.

A population of random samples is scored; then, until the budget runs out, a tournament of ``tournament``
members drawn at random picks its best, a mutation of it (``sparsearch.search.allocation.mutate``: swap units in
the node space, swap positions in the weight space, move kept weights between layers in the allocation space)
is scored and joins the population, and the OLDEST member dies (not the worst: aging keeps the search from
sticking to a candidate that scored well by luck, which matters with noisy short-training scores).

Candidates are scored at half of Random Search's short-training length by default, so the same budget buys
about twice as many evaluations.
"""

from __future__ import annotations

from collections import deque

import torch

from sparsearch.search.allocation import can_mutate, mutate
from sparsearch.search.methods import SEARCH_METHODS, AskTellMethod, Candidate, Evaluation, SearchProblem, rank_key

FIDELITY_FRACTION = 0.5


@SEARCH_METHODS.register("evolution")
class RegularizedEvolution(AskTellMethod):
    """Aging evolution (see the module doc).

    Args:
        problem: the search problem (its space must support mutation).
        budget_flops: the search budget; the search runs until the next child would exceed it.
        steps: short-training steps per candidate (default: half the problem's).
        population: population size (default: half the evaluations the budget affords, at least 2).
        tournament: members drawn per tournament (default: a third of the population, at least 2).
    """

    name = "evolution"

    def __init__(
        self,
        problem: SearchProblem,
        budget_flops: int,
        *,
        steps: int | None = None,
        population: int | None = None,
        tournament: int | None = None,
    ) -> None:
        super().__init__(problem, budget_flops)
        if not can_mutate(problem.space):
            raise ValueError(
                f"search method 'evolution' does not fit {type(problem.space).__name__}: it needs a node, weight "
                "or allocation space, or a space with a mutate(masks, generator) method"
            )
        self.steps = steps or max(1, round(FIDELITY_FRACTION * problem.short_train_steps))
        self.generator = torch.Generator().manual_seed(problem.seed)
        reference = problem.space.sample(torch.Generator().manual_seed(problem.seed))
        affordable = budget_flops // max(1, problem.evaluation_flops(Candidate(-1, reference, self.steps)))
        self.population_size = population or max(2, int(affordable) // 2)
        self.tournament = min(self.population_size, tournament or max(2, round(self.population_size / 3)))
        self.population: deque[int] = deque()  # candidate ids, oldest first
        self.removed: list[int] = []  # ids that died of age, in order
        self._initial_asked = False
        self._waiting = 0

    def ask(self) -> list[Candidate]:
        if not self._initial_asked:
            self._initial_asked = True
            batch = [
                self.new_candidate(self.problem.space.sample(self.generator), self.steps)
                for _ in range(self.population_size)
            ]
            self._waiting = len(batch)
            return batch
        if self._waiting:
            return []
        drawn = torch.randperm(len(self.population), generator=self.generator)[: self.tournament].tolist()
        members = [self.population[index] for index in drawn]
        parent = max(sorted(members), key=lambda member: rank_key(self.evaluations[member]))
        self._waiting = 1
        return [self.new_candidate(mutate(self.problem.space, self.masks[parent], self.generator), self.steps)]

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        super().tell(candidate, evaluation)
        self._waiting = max(0, self._waiting - 1)
        self.population.append(candidate.id)
        if len(self.population) > self.population_size:
            self.removed.append(self.population.popleft())
