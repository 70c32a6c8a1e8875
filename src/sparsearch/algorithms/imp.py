"""Iterative magnitude pruning with weight rewinding, and sparse model soups (Zimmer et al., ICLR 2024).

Both are multi-phase procedures. The drivers :func:`imp` and :func:`sparse_soup` call a user-provided
``train_fn(model, sparsifier)`` once per training run; it builds its optimizer, calls
``sparsifier.attach(model, optimizer)`` and trains (its own loop, unchanged). Phase k prunes by magnitude
to sparsity 1 - (1 - S)^(k / T) (per-phase rate p = 1 - (1 - S)^(1/T)), among the weights still alive.

:class:`IterativeMagnitudePruning` fits IMP into ONE training run of ``total_steps`` (for the study's equal
budget): the run is split into T + 1 equal phases; at each phase boundary it prunes, rewinds every parameter
to its value at ``rewind_step`` (masked) and clears the optimizer state. The learning-rate schedule of the
surrounding loop is not rewound.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsearch.algorithms.dynamic import check_total_steps
from sparsearch.engine.sparsifier import Sparsifier, StaticMaskSparsifier, default_sparsifiable_parameters

TrainFn = Callable[[nn.Module, Sparsifier], None]


def phase_sparsity(final_sparsity: float, phase: int, phases: int) -> float:
    """Sparsity after ``phase`` of ``phases`` pruning rounds: 1 - (1 - S)^(phase / phases)."""
    return 1.0 - (1.0 - final_sparsity) ** (phase / phases)


def _check_phases(phases: int) -> None:
    if not isinstance(phases, int) or phases < 1:
        raise ValueError(f"phases must be a positive integer, got {phases!r}")


class IterativeMagnitudePruning(Sparsifier):
    """IMP with weight rewinding inside one training run (see the module docstring).

    Args:
        sparsity: final fraction of zero weights S.
        phases: number of pruning rounds T (the run has T + 1 training phases).
        rewind_step: the step whose weights every phase restarts from (0: the initialisation).
        total_steps: optimizer steps of the whole run.
        **kwargs: the engine's axes; distribution defaults to "global" (the paper's global magnitude).
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        phases: int = 3,
        rewind_step: int = 0,
        total_steps: int,
        distribution: str = "global",
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity, distribution=distribution, **kwargs)
        _check_phases(phases)
        check_total_steps(total_steps)
        self.phases = phases
        self.phase_length = total_steps // (phases + 1)
        if self.phase_length < 1:
            raise ValueError(f"total_steps={total_steps} is too short for {phases} + 1 phases")
        if not 0 <= rewind_step < self.phase_length:
            raise ValueError(
                f"rewind_step must be in [0, {self.phase_length}) (within the first phase), got {rewind_step}"
            )
        self.rewind_step = rewind_step
        self.rewind_weights: dict[str, torch.Tensor] = {}

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}

    def on_attach(self) -> None:
        if self.rewind_step == 0:
            self._record_rewind_point()

    def _record_rewind_point(self) -> None:
        assert self.model is not None
        self.rewind_weights = {name: p.detach().clone() for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def after_step(self) -> None:
        if self.step == self.rewind_step and not self.rewind_weights:
            self._record_rewind_point()
        phase, offset = divmod(self.step, self.phase_length)
        if offset or not 1 <= phase <= self.phases:
            return
        scores = {name: torch.where(mask, self.params[name].abs(), -1.0) for name, mask in self.masks.items()}
        masks = self.masks_from_scores(scores, phase_sparsity(self.sparsity, phase, self.phases))
        assert self.model is not None and self.optimizer is not None
        for name, param in self.model.named_parameters():
            param.copy_(self.rewind_weights[name])
            self.optimizer.state.pop(param, None)
        self.set_masks(masks)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "phases": self.phases, "rewind_step": self.rewind_step}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rewind_weights": {k: v.cpu().clone() for k, v in self.rewind_weights.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        assert self.model is not None
        device = next(self.model.parameters()).device
        self.rewind_weights = {k: v.to(device) for k, v in state.get("rewind_weights", {}).items()}


def magnitude_prune(
    model: nn.Module, masks: Mapping[str, torch.Tensor], sparsity: float, distribution: str = "global"
) -> dict[str, torch.Tensor]:
    """Masks at ``sparsity`` keeping the largest |w| among the weights ``masks`` still keep."""
    pruner = StaticMaskSparsifier(masks)
    pruner.distribution = distribution
    pruner.attach(model)
    try:
        scores = {name: torch.where(m, pruner.params[name].detach().abs(), -1.0) for name, m in pruner.masks.items()}
        return {name: m.cpu() for name, m in pruner.masks_from_scores(scores, sparsity).items()}
    finally:
        pruner.detach()


def _initial_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in default_sparsifiable_parameters(model).items()}


def _run(train_fn: TrainFn, model: nn.Module, sparsifier: Sparsifier) -> None:
    train_fn(model, sparsifier)
    if sparsifier.model is None:
        raise RuntimeError("train_fn must call sparsifier.attach(model, optimizer) before training")
    sparsifier.detach()


class _RewindRecorder(Sparsifier):
    """A dense pass-through sparsifier that records every parameter at ``rewind_step``."""

    def __init__(self, rewind_step: int) -> None:
        super().__init__(0.0)
        self.rewind_step = rewind_step
        self.rewind_weights: dict[str, torch.Tensor] = {}

    def on_attach(self) -> None:
        if self.rewind_step == 0:
            self._record()

    def after_step(self) -> None:
        if self.step == self.rewind_step:
            self._record()

    def _record(self) -> None:
        assert self.model is not None
        self.rewind_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@dataclass
class PruningResult:
    """Final masks and the sparsity reached after each phase."""

    masks: dict[str, torch.Tensor]
    phase_sparsities: list[float] = field(default_factory=list)
    phase_scores: list[list[float]] = field(default_factory=list)


def imp(
    model: nn.Module,
    train_fn: TrainFn,
    *,
    sparsity: float,
    phases: int = 3,
    rewind_step: int = 0,
    distribution: str = "global",
) -> PruningResult:
    """Iterative magnitude pruning with weight rewinding (Frankle et al. 2020) over T + 1 training runs.

    Run 0 trains dense and records the weights at ``rewind_step``; each later run prunes to the phase's
    sparsity by magnitude, rewinds the weights (and buffers) to ``rewind_step`` and retrains with the mask.
    """
    _check_phases(phases)
    recorder = _RewindRecorder(rewind_step)
    _run(train_fn, model, recorder)
    if not recorder.rewind_weights:
        raise RuntimeError(f"training took fewer than rewind_step={rewind_step} optimizer steps")
    masks = _initial_masks(model)
    result = PruningResult(masks)
    for phase in range(1, phases + 1):
        target = phase_sparsity(sparsity, phase, phases)
        masks = magnitude_prune(model, masks, target, distribution)
        model.load_state_dict(recorder.rewind_weights)
        _run(train_fn, model, StaticMaskSparsifier(masks))
        result.phase_sparsities.append(target)
    result.masks = masks
    return result


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of floating-point entries; other entries (counters) are taken from the first."""
    if not states:
        raise ValueError("cannot average zero models")
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = torch.stack([state[key] for state in states]).mean(dim=0)
        else:
            averaged[key] = first.clone()
    return averaged


def sparse_soup(
    model: nn.Module,
    train_fns: Sequence[TrainFn],
    *,
    sparsity: float,
    phases: int = 3,
    greedy: bool = False,
    val_fn: Callable[[nn.Module], float] | None = None,
    recalibrate_fn: Callable[[nn.Module], None] | None = None,
    distribution: str = "global",
) -> PruningResult:
    """Sparse model soups: each phase prunes, retrains one copy per ``train_fns`` entry with the same mask and
    averages them; the next phase starts from the average.

    ``train_fns`` vary one setting each (batch order seed, weight decay, ...). ``greedy=True`` adds copies in
    order of validation score (``val_fn(model)``, higher is better) and keeps a copy only if the soup's score
    does not drop. ``recalibrate_fn(model)`` re-estimates BatchNorm statistics of each soup.
    Start from a trained (dense or sparse) model.
    """
    _check_phases(phases)
    if len(train_fns) < 1:
        raise ValueError("sparse_soup needs at least one train function")
    if greedy and val_fn is None:
        raise ValueError("greedy soups need val_fn(model) -> validation score")
    masks = _initial_masks(model)
    result = PruningResult(masks)
    for phase in range(1, phases + 1):
        target = phase_sparsity(sparsity, phase, phases)
        masks = magnitude_prune(model, masks, target, distribution)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in masks:
                    param.mul_(masks[name].to(param.device))
        ingredients = []
        for train_fn in train_fns:
            candidate = copy.deepcopy(model)
            _run(train_fn, candidate, StaticMaskSparsifier(masks))
            ingredients.append(candidate.state_dict())
        soup, scores = _mix(model, ingredients, greedy, val_fn, recalibrate_fn)
        model.load_state_dict(soup)
        result.phase_sparsities.append(target)
        result.phase_scores.append(scores)
    result.masks = masks
    return result


def _mix(
    model: nn.Module,
    ingredients: list[dict[str, torch.Tensor]],
    greedy: bool,
    val_fn: Callable[[nn.Module], float] | None,
    recalibrate_fn: Callable[[nn.Module], None] | None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    def evaluate(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state)
        if recalibrate_fn is not None:
            recalibrate_fn(model)
        return float(val_fn(model)) if val_fn is not None else float("nan")

    if not greedy:
        soup = average_state_dicts(ingredients)
        score = evaluate(soup)
        return {k: v.clone() for k, v in model.state_dict().items()}, [score]
    ranked = sorted(ingredients, key=evaluate, reverse=True)
    chosen = [ranked[0]]
    best = evaluate(ranked[0])
    scores = [best]
    for ingredient in ranked[1:]:
        score = evaluate(average_state_dicts([*chosen, ingredient]))
        scores.append(score)
        if score >= best:
            chosen.append(ingredient)
            best = score
    evaluate(average_state_dicts(chosen))
    return {k: v.clone() for k, v in model.state_dict().items()}, scores
