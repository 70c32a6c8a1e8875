"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Sparsity follows s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3 from ``begin`` to ``end``; every
``update_every`` (dt) steps, and at ``end`` itself, the smallest-magnitude active weights are pruned to reach
s_t with the distribution's exact counts. Pruned weights never come back. Any other sparsity schedule may be
passed as ``schedule``.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsearch.algorithms.dynamic import check_total_steps, resolve_step
from sparsearch.engine.sparsifier import Sparsifier
from sparsearch.sparsity.distribution import check_sparsity
from sparsearch.sparsity.schedules import Cubic, Schedule


class GMP(Sparsifier):
    """Prune by magnitude on a cubic schedule from ``initial_sparsity`` to ``sparsity``.

    Args:
        sparsity: final fraction of zero weights s_f, in [0, 1).
        initial_sparsity: s_i at ``begin`` (0: start dense).
        begin, end: the pruning window, as steps or fractions of ``total_steps`` (default 0 and 0.75).
        update_every: dt, steps between pruning events (100).
        total_steps: length of training in optimizer steps (needed when begin/end are fractions).
        schedule: a sparsity schedule replacing the cubic one.
        **kwargs: the engine's axes (distribution, structure, include, dense_layers, seed).
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        initial_sparsity: float = 0.0,
        begin: float | int = 0,
        end: float | int = 0.75,
        update_every: int = 100,
        total_steps: int | None = None,
        schedule: Schedule | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity, **kwargs)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive number of steps, got {update_every!r}")
        check_total_steps(total_steps)
        self.begin_step = resolve_step(begin, total_steps, "begin") or 0
        end_step = resolve_step(end, total_steps, "end")
        assert end_step is not None
        if end_step <= self.begin_step:
            raise ValueError(f"end (step {end_step}) must come after begin (step {self.begin_step})")
        if total_steps is not None and end_step > total_steps:
            raise ValueError(
                f"GMP would never reach sparsity {self.sparsity}: pruning ends at step {end_step} (end={end!r}), "
                f"after training ends at total_steps={total_steps}; pass end <= total_steps or a fraction"
            )
        self.end_step = end_step
        self.update_every = update_every
        self.schedule = schedule or Cubic(
            self.initial_sparsity, self.sparsity, self.begin_step, self.end_step, every=update_every
        )

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return self.masks_from_scores(self.compute_scores(), self.schedule(0))

    def is_update_step(self, step: int | None = None) -> bool:
        """Whether masks are pruned after the optimizer step that makes ``step`` (default: the steps done)."""
        step = self.step if step is None else step
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.update_every == 0 or step == self.end_step

    def masks_fixed_for_next_step(self) -> bool:
        # pruning happens after the step that brings the count to an update step, on the dense weights
        return not self.is_update_step(self.step + 1)

    def after_step(self) -> None:
        if not self.is_update_step():
            return
        scores = {name: torch.where(mask, self.params[name].detach().abs(), -1.0) for name, mask in self.masks.items()}
        self.set_masks(self.masks_from_scores(scores, self.schedule(self.step)))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "initial_sparsity": self.initial_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "update_every": self.update_every,
        }
