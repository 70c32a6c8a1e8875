"""Static masks chosen once at initialisation: random, magnitude, SNIP, GraSP, SynFlow.

Each is :class:`StaticSparsifier` with a different ``score`` (the score axis). The mask never changes during
training; the engine keeps weights, gradients and optimizer state masked. SNIP and GraSP need one data batch
(``batch=`` here or in ``attach``); SynFlow is data-free but needs the per-sample input shape (``input_shape=``,
or taken from a batch, or from the first layer when it is a Linear).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsearch.engine.sparsifier import SPARSIFIABLE_MODULES, Sparsifier
from sparsearch.sparsity.scores import SCORES, Batch, LossFn, compute_scores, synflow_scores


def infer_input_shape(model: nn.Module, batch: Batch | None = None) -> tuple[int, ...]:
    """Per-sample input shape from a batch, or from the model's first layer when it is a Linear."""
    if batch is not None:
        return tuple(batch[0].shape[1:])
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, SPARSIFIABLE_MODULES):
            break
    raise ValueError("cannot infer the input shape of a model that starts with a Conv layer; pass input_shape=")


class StaticSparsifier(Sparsifier):
    """A fixed mask chosen at attach time by ``score`` under the distribution and structure.

    Args:
        sparsity: fraction of zero weights, in [0, 1).
        score: "magnitude", "random", "gradient", "snip", "grasp" or "synflow".
        batch: (inputs, targets) for data-dependent scores (may also be given to ``attach``).
        loss_fn: loss for data-dependent scores (cross-entropy by default).
        input_shape: per-sample input shape for SynFlow.
        rounds: SynFlow pruning rounds (exponential schedule of density: d^(k/rounds)), 100 in the paper.
        **kwargs: the engine's axes (distribution, structure, include, dense_layers, seed).
    """

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        score: str = "random",
        batch: Batch | None = None,
        loss_fn: LossFn = F.cross_entropy,
        input_shape: tuple[int, ...] | None = None,
        rounds: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity, **kwargs)
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; allowed: {', '.join(SCORES)}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.score_kind = score
        self.default_batch = batch
        self.loss_fn = loss_fn
        self.input_shape = input_shape
        self.rounds = rounds

    def masks_fixed_for_next_step(self) -> bool:
        return True  # chosen once at attach, then fixed: train(sparse_kernels=True) can run every step on the kernels

    def compute_scores(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        batch = self.batch if self.batch is not None else self.default_batch
        input_shape = self.input_shape
        if input_shape is None and self.score_kind == "synflow":
            input_shape = infer_input_shape(self.model, batch)
        return compute_scores(
            self.score_kind,
            self.model,
            self.params,
            batch=batch,
            loss_fn=self.loss_fn,
            generator=self.generator,
            input_shape=input_shape,
        )

    def initial_masks(self) -> dict[str, torch.Tensor]:
        if self.score_kind != "synflow":
            return super().initial_masks()
        return self._iterative_synflow_masks()

    def _iterative_synflow_masks(self) -> dict[str, torch.Tensor]:
        """SynFlow's iterative pruning: re-score and prune to density (1-s)^(k/rounds) for k = 1..rounds."""
        assert self.model is not None
        batch = self.batch if self.batch is not None else self.default_batch
        input_shape = self.input_shape or infer_input_shape(self.model, batch)
        masks: Mapping[str, torch.Tensor] | None = None
        density = 1.0 - self.sparsity
        tokens = batch[0] if batch is not None and not batch[0].is_floating_point() else None
        for round_index in range(1, self.rounds + 1):
            scores = synflow_scores(self.model, self.params, input_shape, masks, token_inputs=tokens)
            if masks is not None:
                scores = {name: torch.where(masks[name], s, -1.0) for name, s in scores.items()}
            masks = self.masks_from_scores(scores, 1.0 - density ** (round_index / self.rounds))
        assert masks is not None
        return dict(masks)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "score": self.score_kind}


class StaticRandom(StaticSparsifier):
    """A random mask with the distribution's exact per-layer counts (Liu et al. 2022's random pruning)."""

    def __init__(self, sparsity: float | None = None, **kwargs: Any) -> None:
        super().__init__(sparsity, score="random", **kwargs)


class StaticMagnitude(StaticSparsifier):
    """Keep the largest |w| at initialisation."""

    def __init__(self, sparsity: float | None = None, **kwargs: Any) -> None:
        super().__init__(sparsity, score="magnitude", **kwargs)


class SNIP(StaticSparsifier):
    """SNIP (Lee et al. 2019): keep the largest |w * dL/dw| on one batch; global ranking as in the paper."""

    def __init__(self, sparsity: float | None = None, *, distribution: str = "global", **kwargs: Any) -> None:
        super().__init__(sparsity, score="snip", distribution=distribution, **kwargs)


class GraSP(StaticSparsifier):
    """GraSP (Wang et al. 2020): keep by w * (H g) (removes the largest -w*Hg), global ranking."""

    def __init__(self, sparsity: float | None = None, *, distribution: str = "global", **kwargs: Any) -> None:
        super().__init__(sparsity, score="grasp", distribution=distribution, **kwargs)


class SynFlow(StaticSparsifier):
    """SynFlow (Tanaka et al. 2020): data-free, iterative (100 rounds, exponential schedule), global ranking."""

    def __init__(self, sparsity: float | None = None, *, distribution: str = "global", **kwargs: Any) -> None:
        super().__init__(sparsity, score="synflow", distribution=distribution, **kwargs)
