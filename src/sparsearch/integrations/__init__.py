"""Callbacks that attach any sparsifier to the trainers most users train with.

- ``sparsearch.integrations.transformers.SparsifierCallback``: a ``transformers.TrainerCallback``;
- ``sparsearch.integrations.lightning.SparsifierCallback``: a ``lightning.pytorch.Callback``.

Each attaches the sparsifier to the trainer's model and its (unwrapped) optimizer when training starts, so mask
updates are counted in optimizer steps (with gradient accumulation, one step per accumulated batch), saves the
sparsifier's state with every trainer checkpoint and restores it on resume (the masks come from the
checkpoint, so the restored weights and optimizer state are never re-masked with a new mask). Both modules
import their trainer library; this package imports neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsearch.engine.sparsifier import Sparsifier

#: a sparsifier, or a factory called with the trainer's total number of optimizer steps
SparsifierSpec = Sparsifier | Callable[[int], Sparsifier]
STATE_FILE = "sparsearch_sparsifier.safetensors"


def make_sparsifier(spec: SparsifierSpec, total_steps: int) -> Sparsifier:
    """The sparsifier itself, or the factory's result for ``total_steps``."""
    sparsifier = spec if isinstance(spec, Sparsifier) else spec(total_steps)
    if not isinstance(sparsifier, Sparsifier):
        raise TypeError(f"expected a Sparsifier or a factory returning one, got {type(sparsifier).__name__}")
    return sparsifier


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrappers (accelerate's AcceleratedOptimizer, LightningOptimizer):
    the sparsifier hooks the optimizer whose step really runs."""
    seen = 0
    while not type(optimizer).__module__.startswith("torch.optim") and hasattr(optimizer, "optimizer") and seen < 5:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"the trainer's optimizer is not a torch optimizer: {type(optimizer).__name__}")
    return optimizer


__all__ = ["STATE_FILE", "SparsifierSpec", "make_sparsifier", "unwrap_optimizer"]
