"""The standard sparse-training algorithms, each a small Sparsifier subclass, and their study arms.

``ALGORITHM_ARMS`` maps an arm name to ``factory(sparsity, *, total_steps, steps_per_epoch, seed,
distribution[, batch]) -> Sparsifier``; the study attaches the result with ``attach(model, optimizer)``.
Budget adaptations (documented, the classes keep the papers' defaults):

- RigL and GMP update every ``min(100, steps_per_epoch)`` steps, so short study runs still see updates;
  SET updates once per epoch. RigL and GMP stop updating at 75% of training.
- "static-random-uniform"/"static-random-erk" fix their distribution; every other arm uses the study's.
- "srste" and "pgf" ignore the exact sparsity grid value: they use the N:M pattern (M a power of two up to
  32) closest to it (0.8 -> 3:16 = 81.25%, 0.9 -> 3:32 = 90.6%, 0.95 -> 1:16 = 93.75%, 0.98 -> 1:32 =
  96.9%), and layers whose input dimension M does not divide stay dense; the measured sparsity is reported.
  PGF decays beta linearly to 0 at 80% of training, then fine-tunes with the hard N:M mask. Both keep dense
  weights while training and bake the N:M mask into them after the last step.
- "imp" runs 3 pruning rounds inside the one training run (4 equal phases), rewinding to the end of the
  first epoch (capped to half a phase).
- Sparse model soups need several training runs per phase: use :func:`sparse_soup` directly (no arm).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsearch.algorithms.dynamic import SET, DynamicSparsifier, RigL
from sparsearch.algorithms.gmp import GMP
from sparsearch.algorithms.imp import (
    IterativeMagnitudePruning,
    PruningResult,
    average_state_dicts,
    imp,
    magnitude_prune,
    sparse_soup,
)
from sparsearch.algorithms.nm import PGF, SRSTE, nm_for_sparsity
from sparsearch.algorithms.static import (
    SNIP,
    GraSP,
    StaticMagnitude,
    StaticRandom,
    StaticSparsifier,
    SynFlow,
)
from sparsearch.engine.sparsifier import Sparsifier

Batch = tuple[torch.Tensor, torch.Tensor]
ArmFactory = Callable[..., Sparsifier]


def _update_every(steps_per_epoch: int) -> int:
    return max(1, min(100, steps_per_epoch))


def _static_random_uniform(
    sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str
) -> Sparsifier:
    return StaticRandom(sparsity, distribution="uniform", seed=seed)


def _static_random_erk(
    sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str
) -> Sparsifier:
    return StaticRandom(sparsity, distribution="erk", seed=seed)


def _static_magnitude(
    sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str
) -> Sparsifier:
    return StaticMagnitude(sparsity, distribution=distribution, seed=seed)


def _snip(
    sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str, batch: Batch | None = None
) -> Sparsifier:
    return SNIP(sparsity, distribution=distribution, seed=seed, batch=batch)


def _grasp(
    sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str, batch: Batch | None = None
) -> Sparsifier:
    return GraSP(sparsity, distribution=distribution, seed=seed, batch=batch)


def _synflow(
    sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str, batch: Batch | None = None
) -> Sparsifier:
    return SynFlow(sparsity, distribution=distribution, seed=seed, batch=batch)


def _gmp(sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str) -> Sparsifier:
    return GMP(
        sparsity,
        distribution=distribution,
        total_steps=total_steps,
        update_every=_update_every(steps_per_epoch),
        seed=seed,
    )


def _set(sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str) -> Sparsifier:
    return SET(sparsity, update_every=max(1, steps_per_epoch), distribution=distribution, seed=seed)


def _rigl(sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str) -> Sparsifier:
    return RigL(
        sparsity,
        distribution=distribution,
        total_steps=total_steps,
        update_every=_update_every(steps_per_epoch),
        seed=seed,
    )


def _srste(sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str) -> Sparsifier:
    pattern = nm_for_sparsity(sparsity)
    return SRSTE(pattern.n, pattern.m, total_steps=total_steps, incompatible="dense", seed=seed)


def _pgf(sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str) -> Sparsifier:
    pattern = nm_for_sparsity(sparsity)
    finetune = max(1, int(0.8 * total_steps))
    return PGF(
        pattern.n,
        pattern.m,
        method="mask",
        rate=1.0 / finetune,
        finetune=finetune,
        total_steps=total_steps,
        incompatible="dense",
        seed=seed,
    )


def _imp(sparsity: float, *, total_steps: int, steps_per_epoch: int, seed: int, distribution: str) -> Sparsifier:
    phases = 3
    phase_length = total_steps // (phases + 1)
    return IterativeMagnitudePruning(
        sparsity,
        phases=phases,
        total_steps=total_steps,
        rewind_step=min(steps_per_epoch, phase_length // 2),
        distribution=distribution,
        seed=seed,
    )


ALGORITHM_ARMS: dict[str, ArmFactory] = {
    "static-random-uniform": _static_random_uniform,
    "static-random-erk": _static_random_erk,
    "static-magnitude": _static_magnitude,
    "snip": _snip,
    "grasp": _grasp,
    "synflow": _synflow,
    "gmp": _gmp,
    "set": _set,
    "rigl": _rigl,
    "srste": _srste,
    "pgf": _pgf,
    "imp": _imp,
}

__all__ = [
    "ALGORITHM_ARMS",
    "GMP",
    "PGF",
    "SET",
    "SNIP",
    "SRSTE",
    "DynamicSparsifier",
    "GraSP",
    "IterativeMagnitudePruning",
    "PruningResult",
    "RigL",
    "StaticMagnitude",
    "StaticRandom",
    "StaticSparsifier",
    "SynFlow",
    "average_state_dicts",
    "imp",
    "magnitude_prune",
    "nm_for_sparsity",
    "sparse_soup",
]
