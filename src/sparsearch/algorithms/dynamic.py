"""Dynamic sparse training: drop and regrow connections during training at constant sparsity (SET, RigL).

:class:`DynamicSparsifier` owns the shared loop: start from a random mask with the distribution's exact
counts; every ``update_every`` steps until ``stop``, per layer drop a fraction of the active weights
(``drop_mask``) and grow as many among the inactive ones by ``grow_scores``. Grown weights start at zero
with zero optimizer state (the engine keeps both zero at masked positions). A weight dropped and grown back
in the same update keeps its value (RigL's reference behaviour). SET and RigL differ only in their hooks.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from sparsearch.engine.sparsifier import Sparsifier
from sparsearch.sparsity.masks import topk_mask
from sparsearch.sparsity.schedules import Constant, Cosine, Schedule, as_schedule
from sparsearch.sparsity.scores import random_scores
from sparsearch.sparsity.structures import Unstructured


def check_total_steps(total_steps: int | None) -> int | None:
    """``total_steps`` as given, refused unless it is None or a positive int (the length of training in optimizer
    steps)."""
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total_steps!r}")
    return total_steps


def resolve_step(value: float | int | None, total_steps: int | None, name: str) -> int | None:
    """A step from an absolute int or a fraction of ``total_steps`` (a float in (0, 1])."""
    if value is None:
        return None
    if isinstance(value, float) and 0.0 < value <= 1.0:
        if total_steps is None:
            raise ValueError(f"{name}={value} is a fraction of training: pass total_steps= as well")
        return int(value * total_steps)
    if isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"{name} must be a step (int >= 0) or a fraction of training in (0, 1], got {value!r}")


class DynamicSparsifier(Sparsifier):
    """Drop-and-grow at constant sparsity; override ``drop_mask`` and ``grow_scores``.

    Args:
        sparsity: fraction of zero weights, in [0, 1).
        update_every: steps between mask updates (delta_t).
        stop: last step with updates, as a step or a fraction of ``total_steps`` (None: never stop).
        total_steps: length of training in optimizer steps (needed when ``stop`` is a fraction).
        drop_fraction: fraction alpha of active weights replaced per update; a number or a schedule.
        drop_decay: "cosine" (alpha/2 * (1 + cos(pi t / stop)), RigL) or "constant" (SET); ignored when
            ``drop_fraction`` is already a schedule.
        **kwargs: the engine's axes (distribution, include, dense_layers, seed); unstructured only.
    """

    #: whether the regular optimizer step is skipped on update steps (RigL's reference code does)
    skip_update_step = False
    #: whether updates need dense gradients (counted in ``dense_gradient_steps`` for training FLOPs)
    needs_dense_gradients = False

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        update_every: int = 100,
        stop: float | int | None = 0.75,
        total_steps: int | None = None,
        drop_fraction: float | Schedule = 0.3,
        drop_decay: str = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity, **kwargs)
        if not isinstance(self.structure, Unstructured):
            raise ValueError(f"{type(self).__name__} supports unstructured masks only, not {self.structure}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive number of steps, got {update_every!r}")
        if drop_decay not in ("cosine", "constant"):
            raise ValueError(f"drop_decay must be 'cosine' or 'constant', got {drop_decay!r}")
        self.update_every = update_every
        self.total_steps = check_total_steps(total_steps)
        self.stop_step = resolve_step(stop, total_steps, "stop")
        if total_steps is not None:
            self._check_some_update(stop)
        if isinstance(drop_fraction, int | float):
            if not 0.0 <= drop_fraction <= 1.0:
                raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
            if drop_decay == "cosine" and self.stop_step:
                drop_fraction = Cosine(float(drop_fraction), 0.0, 0, self.stop_step)
            else:
                drop_fraction = Constant(float(drop_fraction))
        self.drop_fraction = as_schedule(drop_fraction, "drop_fraction")
        self.updates = 0

    def _check_some_update(self, stop: float | int | None) -> None:
        # a schedule without a single update inside training is a static mask under another name: refuse it
        assert self.total_steps is not None
        last = self.total_steps if self.stop_step is None else min(self.stop_step, self.total_steps)
        if self.update_every < last:
            return
        if self.stop_step is not None and self.stop_step < self.total_steps:
            where = f"updates stop at step {self.stop_step} (stop={stop!r} of total_steps={self.total_steps})"
        else:
            where = f"training ends at total_steps={self.total_steps}"
        raise ValueError(
            f"{type(self).__name__} would never update its mask: the first update is at step "
            f"update_every={self.update_every}, but {where}; lower update_every or train longer"
        )

    def compute_scores(self) -> dict[str, torch.Tensor]:
        return random_scores(self.params, self.generator)

    def is_update_step(self) -> bool:
        return (
            self.step > 0
            and self.step % self.update_every == 0
            and (self.stop_step is None or self.step < self.stop_step)
        )

    def keeps_gradients_dense(self) -> bool:
        return self.needs_dense_gradients and self.is_update_step()

    def masks_fixed_for_next_step(self) -> bool:
        return not self.is_update_step()  # an update step reads the dense weights (and RigL dense gradients)

    def before_step(self) -> None:
        if not self.is_update_step():
            return
        if self.needs_dense_gradients:
            self.dense_gradient_steps += 1
        self.update_masks(self.drop_fraction(self.step))
        if self.skip_update_step:
            self.skip_optimizer_step()

    @torch.no_grad()
    def update_masks(self, fraction: float) -> None:
        """One drop-and-grow update of every layer with drop fraction ``fraction``."""
        grow_scores = self.grow_scores()
        new_masks = {}
        for name, mask in self.masks.items():
            weight = self.params[name].detach()
            kept = mask & ~self.drop_mask(name, weight, mask, fraction)
            candidates = ~kept
            n_grow = min(int(mask.count_nonzero()) - int(kept.count_nonzero()), int(candidates.count_nonzero()))
            score = torch.where(candidates, grow_scores[name].float(), -math.inf)
            new_masks[name] = kept | (topk_mask(score, n_grow) & candidates)
        self.set_masks(new_masks)
        self.updates += 1

    def drop_mask(self, name: str, weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
        """Active weights to drop: floor(fraction * active) with the smallest |w| (magnitude drop)."""
        n_drop = math.floor(fraction * int(mask.count_nonzero()))
        score = torch.where(mask, -weight.abs().float(), -math.inf)
        return topk_mask(score, n_drop) & mask

    def grow_scores(self) -> dict[str, torch.Tensor]:
        """Scores for growing inactive weights (higher grows first)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {**super().config(), "update_every": self.update_every, "stop_step": self.stop_step}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        self.updates = int(state.get("updates", 0))


class SET(DynamicSparsifier):
    """SET (Mocanu et al. 2018): every epoch drop the fraction ``drop_fraction`` (the paper's zeta) of the smallest
    positive weights and of the negative weights closest to zero, regrow as many at random; ER initial
    distribution.

    Pass ``update_every=steps_per_epoch`` for the paper's once-per-epoch update (required). Grown weights start at
    zero; active weights still exactly zero at the next update are dropped first. ``zeta=`` is accepted as a
    deprecated alias of ``drop_fraction=`` (the name every algorithm here uses).
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        update_every: int,
        drop_fraction: float | Schedule = 0.3,
        stop: float | int | None = None,
        distribution: str = "er",
        zeta: float | Schedule | None = None,
        **kwargs: Any,
    ) -> None:
        if zeta is not None:
            if drop_fraction != 0.3:
                raise TypeError("pass drop_fraction= only (zeta= is its deprecated alias), not both")
            warnings.warn("SET(zeta=...) is deprecated; use drop_fraction=", DeprecationWarning, stacklevel=2)
            drop_fraction = zeta
        super().__init__(
            sparsity,
            update_every=update_every,
            stop=stop,
            drop_fraction=drop_fraction,
            drop_decay="constant",
            distribution=distribution,
            **kwargs,
        )

    def drop_mask(self, name: str, weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
        # active weights that are exactly zero (grown into a dead path, never updated) count as the smallest
        # positives, so they are recycled first instead of piling up as dead connections
        positive = mask & (weight >= 0)
        negative = mask & (weight < 0)
        smallest_positive = topk_mask(
            torch.where(positive, -weight.float(), -math.inf), math.floor(fraction * int(positive.count_nonzero()))
        )
        closest_negative = topk_mask(
            torch.where(negative, weight.float(), -math.inf), math.floor(fraction * int(negative.count_nonzero()))
        )
        return (smallest_positive & positive) | (closest_negative & negative)

    def grow_scores(self) -> dict[str, torch.Tensor]:
        return random_scores(self.params, self.generator)


class RigL(DynamicSparsifier):
    """RigL (Evci et al. 2020): drop the smallest |w|, grow where the dense gradient |dL/dw| is largest.

    Defaults from the paper: update every 100 steps until 75% of training (``stop=0.75``, needs
    ``total_steps``), drop fraction 0.3 decayed with a cosine, ERK distribution. On update steps the regular
    optimizer step is skipped, as in the reference code, so grown weights are exactly zero after the update.

    Gradients: after ``backward()`` the gradients of masked weights are zero on every step except the update
    steps, where they stay dense until the optimizer step (the grow step reads them there; that optimizer step
    is skipped, so clipping on it changes nothing). With gradient accumulation the dense gradient is the
    accumulated one.
    """

    skip_update_step = True
    needs_dense_gradients = True

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        update_every: int = 100,
        stop: float | int | None = 0.75,
        total_steps: int | None = None,
        drop_fraction: float | Schedule = 0.3,
        drop_decay: str = "cosine",
        distribution: str = "erk",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            sparsity,
            update_every=update_every,
            stop=stop,
            total_steps=total_steps,
            drop_fraction=drop_fraction,
            drop_decay=drop_decay,
            distribution=distribution,
            **kwargs,
        )

    def grow_scores(self) -> dict[str, torch.Tensor]:
        return {
            name: p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p)
            for name, p in self.params.items()
        }
