"""Search methods on one interface, under one budget counted in FLOPs.

A search method finds masks in a search space for a parent network. Every method of a study gets the same
budget: by default what Random Search spends at that cell (``random_search_flops``: N candidates scored by the
study's scorer). A method is stopped before an evaluation that would take it past the budget, and what it spent
is reported (``SearchOutcome.flops``; never above ``budget_flops``, except with a scorer of your own whose cost is
known only after it ran: see ``AskTellMethod.run``).

Population methods (Random Search, successive halving, evolution, TPE) are ask/tell: ``ask()`` returns the
candidates that can be evaluated now (``AskTellMethod.run`` hands each batch to ``evaluate_many``, which may
evaluate it in parallel: ``ParallelEvaluator``); ``tell()`` returns each result. Gradient methods (DASS) run
their own loop and charge every step to the budget.

FLOP convention (the training loop's): a short-training step of ``b`` samples costs ``3 * b`` forward passes of
the candidate's non-zero weights, an evaluation adds one forward pass of the validation split; SNIP and
SynFlow cost one forward and one backward pass with dense weight gradients per sample.

Register your own method with ``@SEARCH_METHODS.register("name")`` on a :class:`SearchMethod` subclass (or the
entry-point group ``sparsearch.search_methods``); study arms are then named ``name-<space>``.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.data.splits import DataSplits
from sparsearch.engine.sparsifier import StaticMaskSparsifier
from sparsearch.models.flops import FlopMeter
from sparsearch.registry import Registry
from sparsearch.search.scorers import SCORERS, ScoringContext
from sparsearch.search.spaces import SearchSpace, rescale_to_fan_in
from sparsearch.training import (
    TrainBudget,
    batch_order,
    deterministic_algorithms,
    evaluate,
    kernel_layers,
    make_optimizer,
    on_kernels,
)


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Candidate:
    """One thing to evaluate: masks, short-training length (fidelity) and, for a promotion, where to resume."""

    id: int
    masks: dict[str, Tensor]
    steps: int = 0  # short-training steps to reach; ignored by zero-cost scorers
    resume: TrainingState | None = None  # state after an earlier, shorter evaluation of the same masks


@dataclass(frozen=True)
class TrainingState:
    """Where a short training stopped: step count, model and optimizer state (to continue it exactly)."""

    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]


@dataclass(frozen=True)
class Evaluation:
    """The score of a candidate (higher is better), the tie-break loss (lower is better) and its cost."""

    candidate_id: int
    steps: int
    score: float
    loss: float
    flops: int
    seconds: float
    state: TrainingState | None = None


@dataclass
class SearchOutcome:
    """What a search found and what it cost.

    ``evaluations`` lists every evaluation in the order it was told (candidate, steps, score, loss, FLOPs);
    ``flops`` is their total (plus gradient steps for DASS) and never exceeds ``budget_flops``, except with a
    scorer of your own whose cost is known only after it ran: ``overrun_flops`` is then the part above the
    budget (see ``AskTellMethod.run``); ``stopped_by_budget`` says whether the method still wanted to evaluate
    more when the budget ran out.
    """

    method: str
    best_masks: dict[str, Tensor]
    best_id: int
    best_score: float
    budget_flops: int
    flops: int
    seconds: float
    evaluations: list[dict[str, float | int]] = field(default_factory=list)
    stopped_by_budget: bool = False
    overrun_flops: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for the results store."""
        return {
            "method": self.method,
            "budget_flops": int(self.budget_flops),
            "flops": int(self.flops),
            "seconds": float(self.seconds),
            "best_id": int(self.best_id),
            "best_score": float(self.best_score),
            "stopped_by_budget": bool(self.stopped_by_budget),
            "overrun_flops": int(self.overrun_flops),
            "evaluations": self.evaluations,
        }


@dataclass
class SearchProblem:
    """Everything a method needs: the space, a parent factory, data, the scorer and the budget.

    Args:
        space: where candidates come from (``sample(generator)``; evolution also mutates, TPE needs an
            :class:`~sparsearch.search.allocation.AllocationSpace`).
        model_factory: builds a fresh parent (same initialisation every call).
        data: splits; scoring never looks at the test split.
        seed: seeds every draw of the search (candidates, batch order, SNIP batch).
        scorer: "short-train", "snip" or "synflow" (how population methods score a candidate).
        short_train_steps: Random Search's steps per candidate (other methods derive their fidelities from it).
        n_candidates: Random Search's number of candidates (sets the default budget).
        batch_size: batch size of short training and of the SNIP batch.
        train_budget: optimizer settings of short training (learning rate used constant).
        rescale_init: apply ``rescale_to_fan_in`` to every candidate (when the trained arms get it too).
        budget_flops: the search budget; None = what Random Search spends (``random_search_flops``).
        sparse_kernels: short training runs the mask's sparse Linear layers on the sparse kernels (``train``'s
            ``sparse_kernels``): faster at high sparsity, the same scores to summation order.
    """

    space: SearchSpace
    model_factory: Callable[[], nn.Module]
    data: DataSplits
    seed: int
    scorer: str = "short-train"
    short_train_steps: int = 50
    n_candidates: int = 8
    batch_size: int = 128
    train_budget: TrainBudget | None = None
    rescale_init: bool = False
    budget_flops: int | None = None
    sparse_kernels: bool = False
    _meter: FlopMeter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        SCORERS.get(self.scorer)  # an unknown scorer: UnknownNameError naming the registered ones
        _positive_int(self.n_candidates, "n_candidates")
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.short_train_steps, "short_train_steps")
        if self.budget_flops is not None:
            if isinstance(self.budget_flops, bool) or not isinstance(self.budget_flops, int) or self.budget_flops < 1:
                raise ValueError(f"the search budget must be a positive number of FLOPs, got {self.budget_flops!r}")
        self.train_budget = self.train_budget or TrainBudget()

    # --------------------------------------------------------------------------------- cost model
    @property
    def meter(self) -> FlopMeter:
        """The FLOP meter of one parent built once (shapes and per-weight use counts are the same for all)."""
        if self._meter is None:
            self._meter = FlopMeter(self.model_factory(), self.data.input_shape)
        return self._meter

    def forward_flops(self, masks: Mapping[str, Tensor] | None) -> tuple[int, int]:
        """(non-zero, dense) FLOPs of one forward pass of one sample of the parent under ``masks``."""
        count = self.meter.forward(masks)
        return count.nonzero, count.dense

    @property
    def step_samples(self) -> int:
        """Samples per short-training step (and in the SNIP batch)."""
        return min(self.batch_size, len(self.data.y_train))

    def evaluation_flops(self, candidate: Candidate) -> int:
        """What evaluating ``candidate`` costs, known before it runs: short training's remaining steps as
        full batches (the training loop's FLOP meter counts the last, smaller batch of an epoch as it is, so
        this is an upper bound) plus a validation pass; SynFlow one sample and SNIP one batch with dense
        weight gradients; a scorer of your own what its ``cost(masks, context)`` says.

        Raises :class:`UnknownCostError` for a scorer of your own without ``cost``: its FLOPs are known only
        from the ``Score`` it returns, after it ran (see ``AskTellMethod.run`` for how the budget is kept then).
        """
        nonzero, dense = self.forward_flops(candidate.masks)
        if self.scorer == "synflow":
            return 2 * nonzero + dense
        if self.scorer == "snip":
            return self.step_samples * (2 * nonzero + dense)
        if self.scorer == "short-train":
            done = candidate.resume.step if candidate.resume is not None else 0
            return (candidate.steps - done) * self.step_samples * 3 * nonzero + len(self.data.y_val) * nonzero
        cost = getattr(SCORERS.get(self.scorer), "cost", None)
        if cost is None:
            raise UnknownCostError(
                f"scorer {self.scorer!r} reports its FLOPs only after it ran (Score.flops), so the search budget "
                "cannot be set or checked before an evaluation; give the scorer a cost attribute, "
                "cost(masks, context) -> FLOPs (the context's flop_meter counts the parent under the masks)"
            )
        return int(cost(candidate.masks, self.scoring_context(candidate, self.meter)))

    def default_budget(self) -> int:
        """The search budget: ``budget_flops`` if given, else what Random Search spends."""
        return self.budget_flops if self.budget_flops is not None else random_search_flops(self)

    # --------------------------------------------------------------------------------- evaluation
    def scoring_context(self, candidate: Candidate, flop_meter: FlopMeter) -> ScoringContext:
        """What a registered scorer sees besides the candidate's model and masks."""
        return ScoringContext(
            data=self.data,
            budget=self.train_budget,
            seed=self.seed,
            batch_size=self.batch_size,
            short_train_steps=candidate.steps or self.short_train_steps,
            batch=snip_batch(self.data, self.seed, self.batch_size),
            flop_meter=flop_meter,
            sparse_kernels=self.sparse_kernels,
        )

    def fresh_model(self, masks: Mapping[str, Tensor]) -> nn.Module:
        """A new parent for ``masks`` (rescaled to the kept fan-in when the study does so)."""
        model = self.model_factory()
        if self.rescale_init:
            rescale_to_fan_in(model, masks)
        return model

    def evaluate(self, candidate: Candidate) -> Evaluation:
        """Score ``candidate`` with the problem's scorer (in this process).

        Short training runs here, resumable (successive halving continues a promoted candidate where it
        stopped; the shared training loop always starts from scratch); every other scorer is the one
        registered in ``SCORERS``.
        """
        started = time.perf_counter()
        model = self.fresh_model(candidate.masks)
        state = None
        if self.scorer == "short-train":
            flops = self.evaluation_flops(candidate)
            score, loss, state = short_train(
                model,
                candidate.masks,
                self.data,
                steps=candidate.steps,
                batch_size=self.batch_size,
                budget=self.train_budget,
                seed=self.seed,
                resume=candidate.resume,
                sparse_kernels=self.sparse_kernels,
            )
        else:
            context = self.scoring_context(candidate, FlopMeter(model, self.data.input_shape, self.meter.positions))
            result = SCORERS.get(self.scorer)(model, candidate.masks, context)
            score, loss = result.value, -result.tiebreak  # a higher tie-break is a lower "loss"
            # built-ins: the cost charged before (equal to the scorer's count); your own: what it reported
            flops = self.evaluation_flops(candidate) if self.scorer in ("synflow", "snip") else int(result.flops)
        return Evaluation(candidate.id, candidate.steps, score, loss, flops, time.perf_counter() - started, state)


class UnknownCostError(ValueError):
    """A scorer's cost is known only after it ran (a scorer of your own without a ``cost`` attribute)."""


def snip_batch(data: DataSplits, seed: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """The one seeded training batch SNIP scores every candidate on (as Random Search always drew it)."""
    rows = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:batch_size]
    return data.x_train[rows], data.y_train[rows]


def short_train(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    data: DataSplits,
    *,
    steps: int,
    batch_size: int,
    budget: TrainBudget,
    seed: int,
    resume: TrainingState | None = None,
    sparse_kernels: bool = False,
) -> tuple[float, float, TrainingState]:
    """Train with the mask fixed up to ``steps`` steps (from ``resume`` if given); return validation accuracy,
    validation loss and the state to continue from.

    From scratch it performs exactly what ``short_train_evaluation`` does (same batches, same numbers), and
    continuing a run from its state gives the same numbers as one uninterrupted run of the same length: the
    batch order is replayed from the seed and the first ``resume.step`` batches skipped. ``sparse_kernels``: the
    mask's sparse Linear layers train on the sparse kernels (see ``train``), optimizer state included, so a run
    resumes either way.
    """
    _positive_int(steps, "short-train steps")
    start = resume.step if resume is not None else 0
    if start > steps:
        raise ValueError(f"cannot resume a short training at step {start} to reach fewer steps ({steps})")
    optimizer = make_optimizer(model, budget)
    sparsifier = StaticMaskSparsifier(masks, seed=seed).attach(model, optimizer)
    if resume is not None:
        model.load_state_dict(resume.model)
        # a copy: load_state_dict keeps the state's tensors, and the steps below would update them in place, changing
        # the state this run resumes from (a second resume from it started elsewhere)
        optimizer.load_state_dict(copy.deepcopy(resume.optimizer))
    generator = torch.Generator().manual_seed(seed)
    n_train = len(data.y_train)
    device = next(model.parameters()).device
    done = 0
    model.train()
    layers = kernel_layers(model, sparsifier) if sparse_kernels else {}
    kernels = on_kernels(model, layers, sparsifier.masks, optimizer) if layers else nullcontext()
    with deterministic_algorithms(), kernels:
        while done < steps:
            for indices in batch_order(n_train, batch_size, generator):
                if done >= start:
                    inputs, targets = data.x_train[indices].to(device), data.y_train[indices].to(device)
                    loss = F.cross_entropy(model(inputs), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                done += 1
                if done == steps:
                    break
        accuracy, val_loss = evaluate(model, data.x_val, data.y_val)
    sparsifier.detach()
    state = TrainingState(
        steps,
        {name: value.detach().clone() for name, value in model.state_dict().items()},
        optimizer.state_dict(),
    )
    return accuracy, val_loss, state


def random_search_flops(problem: SearchProblem) -> int:
    """What Random Search spends on ``problem``: its N candidates (sampled, not trained) scored once each.

    Raises :class:`UnknownCostError` for a scorer of your own that says its cost only after it ran: give it a
    ``cost`` attribute, or the search an explicit budget.
    """
    sampler = torch.Generator().manual_seed(problem.seed)
    try:
        return sum(
            problem.evaluation_flops(Candidate(index, problem.space.sample(sampler), problem.short_train_steps))
            for index in range(problem.n_candidates)
        )
    except UnknownCostError as error:
        raise UnknownCostError(
            f"{error}; or give the search an explicit budget ([search] budget_flops in a study file)"
        ) from None


def rank_key(evaluation: Evaluation) -> tuple[float, float, float]:
    """Order of candidates: longer training first (a higher fidelity is trusted more), then higher score,
    then lower loss; NaN ranks last."""
    score = -math.inf if math.isnan(evaluation.score) else evaluation.score
    loss = -math.inf if math.isnan(evaluation.loss) else -evaluation.loss
    if math.isnan(evaluation.score):
        loss = -math.inf
    return (float(evaluation.steps), score, loss)


class SearchMethod(ABC):
    """A search method: built for one problem and budget, ``run`` returns the best masks found.

    ``spaces`` names the built-in spaces the method fits (None: any space that samples); ``scorers`` the
    scorers it works with (None: any).
    """

    name: ClassVar[str] = ""
    spaces: ClassVar[tuple[str, ...] | None] = None
    scorers: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, problem: SearchProblem, budget_flops: int) -> None:
        if isinstance(budget_flops, bool) or not isinstance(budget_flops, int) or budget_flops < 1:
            raise ValueError(f"the search budget must be a positive number of FLOPs, got {budget_flops!r}")
        if self.scorers is not None and problem.scorer not in self.scorers:
            raise ValueError(
                f"search method {self.name!r} needs scorer {' or '.join(map(repr, self.scorers))}, "
                f"got {problem.scorer!r}"
            )
        self.problem = problem
        self.budget_flops = budget_flops

    @abstractmethod
    def run(self, evaluate_many: EvaluateMany | None = None) -> SearchOutcome:
        """Search within the budget; ``evaluate_many`` evaluates a batch of candidates (default: here, in order)."""


EvaluateMany = Callable[[SearchProblem, Sequence[Candidate]], list[Evaluation]]


def evaluate_in_order(problem: SearchProblem, candidates: Sequence[Candidate]) -> list[Evaluation]:
    """Evaluate candidates one after another in this process."""
    return [problem.evaluate(candidate) for candidate in candidates]


_POOL_PROBLEM: SearchProblem | None = None  # the problem a pool worker evaluates (inherited by fork)


def _pool_evaluate(candidate: Candidate) -> Evaluation:
    assert _POOL_PROBLEM is not None
    return _POOL_PROBLEM.evaluate(candidate)


def _init_pool_worker(parent_pid: int) -> None:
    torch.set_num_threads(1)
    # a worker whose search process died (even of kill -9) exits instead of waiting for candidates forever
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def parallel_candidates_unavailable() -> str | None:
    """Why this process cannot evaluate candidates on forked workers (None: it can)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork processes"
    if multiprocessing.current_process().daemon:
        return "a daemonic process (e.g. a multiprocessing.Pool worker) may not have children"
    return None


class ParallelEvaluator:
    """Evaluate each batch of candidates on ``workers`` forked processes (one torch thread each).

    Forked, so the problem (its parent factory, space and data) reaches the workers without pickling; only
    candidates and evaluations travel, and every evaluation is the one an in-order evaluation gives (each
    candidate's numbers depend on the problem's seed and the candidate, not on where or when it runs).
    Workers start with the first batch and exit with ``close()`` or when this process dies. Use as a context
    manager. Needs fork (Linux, macOS) and a non-daemonic process: see
    :func:`parallel_candidates_unavailable`.
    """

    def __init__(self, problem: SearchProblem, workers: int) -> None:
        global _POOL_PROBLEM
        _positive_int(workers, "search workers")
        reason = parallel_candidates_unavailable()
        if reason is not None:
            raise RuntimeError(f"cannot evaluate candidates in parallel here: {reason}")
        _POOL_PROBLEM = problem
        self.problem = problem
        self.workers = workers
        self.pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_pool_worker,
            initargs=(os.getpid(),),
        )

    def __call__(self, problem: SearchProblem, candidates: Sequence[Candidate]) -> list[Evaluation]:
        if problem is not self.problem:
            raise ValueError("this ParallelEvaluator was built for another search problem")
        return list(self.pool.map(_pool_evaluate, candidates))

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.shutdown(cancel_futures=True)

    def __enter__(self) -> ParallelEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AskTellMethod(SearchMethod):
    """A method that proposes candidates (``ask``) and learns from their evaluations (``tell``)."""

    def __init__(self, problem: SearchProblem, budget_flops: int) -> None:
        super().__init__(problem, budget_flops)
        self.evaluations: dict[int, Evaluation] = {}
        self.masks: dict[int, dict[str, Tensor]] = {}
        self._next_id = 0

    def new_candidate(self, masks: dict[str, Tensor], steps: int, resume: TrainingState | None = None) -> Candidate:
        """A candidate with the next id (ids count up in the order candidates are proposed)."""
        candidate = Candidate(self._next_id, masks, steps, resume)
        self._next_id += 1
        return candidate

    @abstractmethod
    def ask(self) -> list[Candidate]:
        """Candidates to evaluate now (all can run in parallel); an empty list ends the search."""

    def tell(self, candidate: Candidate, evaluation: Evaluation) -> None:
        """Record an evaluation (subclasses extend this to learn from it)."""
        self.masks[candidate.id] = candidate.masks
        previous = self.evaluations.get(candidate.id)
        if previous is None or evaluation.steps >= previous.steps:
            self.evaluations[candidate.id] = evaluation

    def best(self) -> Evaluation:
        """The best evaluation so far (see :func:`rank_key`; the earliest candidate wins ties)."""
        if not self.evaluations:
            raise RuntimeError(
                f"search method {self.name!r} evaluated no candidate: the budget of {self.budget_flops} FLOPs is "
                "smaller than one evaluation"
            )
        best: Evaluation | None = None
        for candidate_id in sorted(self.evaluations):
            evaluation = self.evaluations[candidate_id]
            if best is None or rank_key(evaluation) > rank_key(best):
                best = evaluation
        assert best is not None
        return best

    def run(self, evaluate_many: EvaluateMany | None = None) -> SearchOutcome:
        """Ask, charge, evaluate, tell, until the method asks for nothing or the budget is spent.

        Every candidate of a batch is charged before any of them runs, and the batch is cut before the first
        candidate that would take the spend past the budget, so a batch evaluated in parallel never overruns
        it. A scorer of your own without a ``cost`` attribute reports its FLOPs only after it ran: its first
        evaluation then runs alone (an error if that alone costs more than the budget), and every later
        candidate is charged in advance the dearest evaluation measured so far; the spend is what the scorer
        reported, and the part above the budget (a candidate dearer than every earlier one) is recorded as
        ``overrun_flops``.
        """
        evaluate_many = evaluate_many or evaluate_in_order
        started = time.perf_counter()
        spent = 0
        stopped = False
        log: list[dict[str, float | int]] = []
        waiting: list[Candidate] = []  # asked, not yet evaluated: the rest of a batch whose first ran alone
        while True:
            batch = waiting or self.ask()
            if not batch:
                break
            affordable: list[Candidate] = []
            waiting = []
            for index, candidate in enumerate(batch):
                cost = self._charge(candidate, log)
                if cost is None:  # cost unknown until one evaluation has been measured: this one runs alone
                    affordable, waiting = [candidate], batch[index + 1 :]
                    break
                if spent + cost > self.budget_flops:
                    stopped = True
                    break
                affordable.append(candidate)
                spent += cost
            for candidate, evaluation in zip(affordable, evaluate_many(self.problem, affordable), strict=True):
                self.tell(candidate, evaluation)
                log.append(
                    {
                        "id": candidate.id,
                        "steps": evaluation.steps,
                        "score": evaluation.score,
                        "loss": evaluation.loss,
                        "flops": evaluation.flops,
                        "seconds": evaluation.seconds,
                    }
                )
            spent = int(sum(entry["flops"] for entry in log))  # what was charged, or measured where unknown
            if len(log) == 1 and spent > self.budget_flops:
                raise RuntimeError(
                    f"search method {self.name!r}: one evaluation by scorer {self.problem.scorer!r} cost {spent} "
                    f"FLOPs, more than the budget of {self.budget_flops} FLOPs"
                )
            if stopped:
                break
        best = self.best()
        return SearchOutcome(
            method=self.name,
            best_masks=self.masks[best.candidate_id],
            best_id=best.candidate_id,
            best_score=best.score,
            budget_flops=self.budget_flops,
            flops=spent,
            seconds=time.perf_counter() - started,
            evaluations=log,
            stopped_by_budget=stopped,
            overrun_flops=max(0, spent - self.budget_flops),
        )

    def _charge(self, candidate: Candidate, log: Sequence[Mapping[str, float | int]]) -> int | None:
        """What ``candidate`` is charged before it runs; None while its scorer's cost is still unknown."""
        try:
            return self.problem.evaluation_flops(candidate)
        except UnknownCostError:
            return int(max(entry["flops"] for entry in log)) if log else None


MethodFactory = type[SearchMethod]
SEARCH_METHODS: Registry[MethodFactory] = Registry("search method", "sparsearch.search_methods")


@SEARCH_METHODS.register("search")
class RandomSearch(AskTellMethod):
    """Random Search: ``n_candidates`` samples of the space, each scored once at ``short_train_steps``.

    Candidate ``i`` is the ``i``-th sample of ``space.sample(Generator().manual_seed(seed))``, so the result is
    the one Random Search has always given for the same seed. All candidates are asked at once (parallel).
    """

    name = "search"

    def __init__(self, problem: SearchProblem, budget_flops: int) -> None:
        super().__init__(problem, budget_flops)
        self._asked = False

    def ask(self) -> list[Candidate]:
        if self._asked:
            return []
        self._asked = True
        sampler = torch.Generator().manual_seed(self.problem.seed)
        return [
            self.new_candidate(self.problem.space.sample(sampler), self.problem.short_train_steps)
            for _ in range(self.problem.n_candidates)
        ]


BUILT_IN_METHODS = ("search", "sh", "evolution", "tpe", "dass")


def built_in_order(method: str) -> tuple[int, str]:
    """Sort key: the built-in methods in the order above (simplest first), then any others by name."""
    return (BUILT_IN_METHODS.index(method), "") if method in BUILT_IN_METHODS else (len(BUILT_IN_METHODS), method)


def check_method_fits(method: str, space: str) -> type[SearchMethod]:
    """The registered method class, if it fits the named space; else a ValueError naming what is allowed."""
    cls = SEARCH_METHODS.get(method)
    if cls.spaces is not None and space not in cls.spaces:
        raise ValueError(
            f"search method {method!r} does not fit search space {space!r}; {method!r} searches: "
            f"{', '.join(cls.spaces)}"
        )
    return cls


def run_method(
    method: str,
    problem: SearchProblem,
    *,
    space_name: str | None = None,
    budget_flops: int | None = None,
    evaluate_many: EvaluateMany | None = None,
) -> SearchOutcome:
    """Run the registered search method ``method`` on ``problem`` under ``budget_flops`` (default: the
    problem's budget, i.e. Random Search's spend). ``space_name`` checks that the method fits the space."""
    cls = check_method_fits(method, space_name) if space_name is not None else SEARCH_METHODS.get(method)
    budget = problem.default_budget() if budget_flops is None else budget_flops
    return cls(problem, budget).run(evaluate_many)
