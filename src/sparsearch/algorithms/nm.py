"""N:M sparse training that keeps dense weights: SR-STE and progressive gradient flow (PGF).

Both recompute the N:M magnitude mask from the dense weights after every optimizer step and compute the
forward pass with a masked copy (see :mod:`sparsearch.engine.forward_mask`). While training,
``model.state_dict()`` holds the dense weights (so training can resume); call ``sparsifier.finalize()`` to
bake the N:M mask into the weights before saving a deployable model. ``report()`` measures the masked
weight the model computes with.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from sparsearch.algorithms.dynamic import check_total_steps, resolve_step
from sparsearch.engine.forward_mask import DenseWeightSparsifier
from sparsearch.sparsity.schedules import Schedule
from sparsearch.sparsity.structures import NM


class _SparseRefinedSTE(torch.autograd.Function):
    """Forward W * m; backward the dense gradient plus decay * (1 - m) * W (Zhou et al. 2021, SR-STE)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        return grad_output + ctx.decay * (~mask) * weight, None, None


def nm_for_sparsity(sparsity: float, max_m: int = 32) -> NM:
    """The N:M pattern (M a power of two in 4..max_m) whose sparsity 1 - N/M is closest to ``sparsity``.

    Ties go to the smaller M (more hardware-friendly). E.g. 0.5 -> 2:4, 0.75 -> 1:4, 0.9 -> 3:32.
    """
    best: NM | None = None
    m = 4
    while m <= max_m:
        n = min(max(round((1.0 - sparsity) * m), 1), m - 1)
        candidate = NM(n, m)
        if best is None or abs(candidate.sparsity - sparsity) < abs(best.sparsity - sparsity) - 1e-12:
            best = candidate
        m *= 2
    assert best is not None
    return best


class SRSTE(DenseWeightSparsifier):
    """SR-STE: N:M magnitude mask recomputed every step, straight-through gradient plus decay*(1-m)*W.

    Args:
        n, m: the pattern (2:4 default).
        decay: lambda_W of the sparse-refined term (2e-4).
        total_steps: when given, the mask is baked into the weights after the last step.
        **kwargs: include, incompatible ("dense" leaves layers whose input dimension M does not divide dense),
            seed.
    """

    def __init__(
        self, n: int = 2, m: int = 4, *, decay: float = 2e-4, total_steps: int | None = None, **kwargs: Any
    ) -> None:
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}")
        super().__init__(structure=NM(n, m), **kwargs)
        self.decay = decay
        self.total_steps = check_total_steps(total_steps)

    def forward_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return _SparseRefinedSTE.apply(weight, self.masks[name], self.decay)

    def after_step(self) -> None:
        for name, mask in self.masks_from_scores(self.compute_scores()).items():
            self._set_mask(name, mask)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "decay": self.decay}


class PGF(DenseWeightSparsifier):
    """Progressive gradient flow for N:M (Bambhaniya et al. 2024).

    ``method="mask"`` (MDGF): forward with W * (m + (1 - m) * beta(t)), beta = max(0, 1 - rate * t) ("linear")
    or exp(-rate * t) ("exponential"), t counted after ``dense_steps``. ``method="structure"`` (SDGF): hard
    masks whose pattern steps down from dense through (M-1):M, M/2:M, M/4:M, ... to N:M in equal frames.
    From ``finetune`` (a step or a fraction of ``total_steps``) beta is 0 and the pattern is N:M.

    Args:
        n, m: the final pattern.
        method: "mask" or "structure".
        decay: "linear" or "exponential" (mask decay), or a schedule for beta itself.
        rate: c in beta = 1 - c*t or exp(-c*t) (2e-4; the paper uses 1e-4..2e-4).
        dense_steps: optional dense phase before the decay starts.
        finetune: start of the final phase with beta = 0 (default 0.8 of ``total_steps``; None: no forced phase).
        total_steps: length of training (needed for fractions and for structure decay frames); the mask is
            baked into the weights after the last step.
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        *,
        method: Literal["mask", "structure"] = "mask",
        decay: str | Schedule = "linear",
        rate: float = 2e-4,
        dense_steps: int = 0,
        finetune: float | int | None = 0.8,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(structure=NM(n, m), **kwargs)
        if method not in ("mask", "structure"):
            raise ValueError(f"method must be 'mask' or 'structure', got {method!r}")
        if isinstance(decay, str) and decay not in ("linear", "exponential"):
            raise ValueError(f"decay must be 'linear', 'exponential' or a schedule, got {decay!r}")
        if rate < 0 or dense_steps < 0:
            raise ValueError(f"rate and dense_steps must be >= 0, got rate={rate}, dense_steps={dense_steps}")
        self.method = method
        self.total_steps = check_total_steps(total_steps)
        self.decay = decay
        self.rate = rate
        self.dense_steps = dense_steps
        self.finetune_step = resolve_step(finetune, total_steps, "finetune")
        if method == "structure" and self.finetune_step is None:
            raise ValueError("structure decay needs the end of its frames: pass finetune= (and total_steps=)")
        if self.finetune_step is not None and self.finetune_step <= dense_steps:
            raise ValueError(f"finetune (step {self.finetune_step}) must come after dense_steps ({dense_steps})")
        nm = self.structure
        assert isinstance(nm, NM)
        patterns = [nm.m - 1]
        n_next = nm.m // 2
        while n_next > nm.n:
            patterns.append(n_next)
            n_next //= 2
        self.pattern_steps = [n_k for n_k in patterns if n_k > nm.n] + [nm.n]

    def beta(self, step: int) -> float:
        """Weight given to masked weights in the forward pass at ``step`` (1: dense, 0: hard N:M)."""
        if step < self.dense_steps:
            return 1.0
        if self.method == "structure" or (self.finetune_step is not None and step >= self.finetune_step):
            return 0.0
        elapsed = step - self.dense_steps
        if not isinstance(self.decay, str):
            return float(self.decay(elapsed))
        if self.decay == "linear":
            return max(0.0, 1.0 - self.rate * elapsed)
        return math.exp(-self.rate * elapsed)

    def pattern(self, step: int) -> NM | None:
        """The hard pattern at ``step`` (None = dense) for structure decay; always N:M for mask decay."""
        nm = self.structure
        assert isinstance(nm, NM)
        if self.method == "mask":
            return nm
        if step < self.dense_steps:
            return None
        assert self.finetune_step is not None
        if step >= self.finetune_step:
            return nm
        frame = (step - self.dense_steps) * len(self.pattern_steps) // (self.finetune_step - self.dense_steps)
        return NM(self.pattern_steps[frame], nm.m)

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return self._masks_at(0)

    def _masks_at(self, step: int) -> dict[str, torch.Tensor]:
        pattern = self.pattern(step)
        if pattern is None:
            return {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}
        return {name: pattern.mask(p.detach().abs()) for name, p in self.params.items()}

    def after_step(self) -> None:
        for name, mask in self._masks_at(self.step).items():
            self._set_mask(name, mask)

    def forward_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        beta = self.beta(self.step)
        if beta >= 1.0:
            return weight
        return torch.where(self.masks[name], weight, weight * beta)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "method": self.method,
            "decay": self.decay if isinstance(self.decay, str) else repr(self.decay),
            "rate": self.rate,
            "dense_steps": self.dense_steps,
            "finetune_step": self.finetune_step,
        }
