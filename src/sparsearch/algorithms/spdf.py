"""Sparse pre-training, dense fine-tuning (SPDF, Thangarasa et al., UAI 2023).

Pre-train with a static random mask (uniform sparsity over the chosen weights; embeddings and the output head
stay dense, as in the paper), then lift the mask and fine-tune every weight on the downstream task: the
pruned positions restart from zero and may grow. Pre-training costs about (1 - sparsity) of the dense
pre-training FLOPs in the masked layers; the claim is that the fine-tuned model is about as good as one
pre-trained dense.

:class:`SPDF` is the phase switch: ``pretrain(model, optimizer)`` attaches the mask, ``finetune()`` lifts it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsearch.algorithms.static import StaticRandom
from sparsearch.engine.sparsifier import Sparsifier


class SPDF:
    """Sparse pre-training then dense fine-tuning.

    Args:
        sparsity: fraction of zero weights among the masked weights during pre-training.
        include: regular expression of the parameter names to mask (default: every Linear/Conv weight; for
            GPT-2's Conv1D layers pass e.g. ``r"\\.(c_attn|c_proj|c_fc)\\.weight$"``).
        **kwargs: passed to :class:`StaticRandom` (``distribution``, ``dense_layers``, ``seed``).
    """

    def __init__(self, sparsity: float, *, include: str | None = None, **kwargs: Any) -> None:
        self.sparsifier: Sparsifier = StaticRandom(sparsity, include=include, **kwargs)
        self.phase = "new"

    def pretrain(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Sparsifier:
        """Mask the model for sparse pre-training (weights, gradients and optimizer state stay zero there)."""
        if self.phase != "new":
            raise RuntimeError(f"SPDF.pretrain was already called (phase {self.phase!r}); use a new SPDF per model")
        self.phase = "pretrain"
        return self.sparsifier.attach(model, optimizer)

    def finetune(self) -> None:
        """Lift the mask: from now on every weight trains (the pruned ones start from zero)."""
        if self.phase != "pretrain":
            raise RuntimeError(f"SPDF.finetune needs a pre-trained model first (phase {self.phase!r})")
        self.sparsifier.finalize()
        self.phase = "finetune"
