"""The standard sparse-training algorithms, each a small Sparsifier subclass, and their study arms.

``ARMS`` (a :class:`~sparsearch.registry.Registry`) maps an arm name to ``factory(setting: ArmSetting) ->
Sparsifier``; the study attaches the result with ``attach(model, optimizer)``. Register your own arm with
``@ARMS.register("my-arm")`` or the entry-point group ``sparsearch.arms``.
Budget adaptations (documented, the classes keep the papers' defaults):

- RigL and GMP update every ``min(100, steps_per_epoch)`` steps (fewer when 75% of the budget is shorter than
  that), so short study runs still see updates; SET updates once per epoch. RigL and GMP stop updating at 75%
  of training.
- "static-random-uniform"/"static-random-erk" fix their distribution; every other arm uses the study's.
- "srste" and "pgf" ignore the exact sparsity grid value: they use the N:M pattern (M a power of two up to
  32) closest to it (0.8 -> 3:16 = 81.25%, 0.9 -> 3:32 = 90.6%, 0.95 -> 1:16 = 93.75%, 0.98 -> 1:32 =
  96.9%), and layers whose input dimension M does not divide stay dense; the measured sparsity is reported.
  PGF decays beta linearly to 0 at 80% of training, then fine-tunes with the hard N:M mask. Both keep dense
  weights while training and bake the N:M mask into them after the last step.
- "imp" runs 3 pruning rounds inside the one training run (4 equal phases), rewinding to the end of the
  first epoch (capped to half a phase).
- "sift-wide", "sift-parallel", "sift-factorized", "sift-doped": RigL (the study's cadence) on the
  Sparse-IFT transformation of the study's model at the same FLOPs as the dense model (see sparse_ift.py).
- Sparse model soups need several training runs per phase: use :func:`sparse_soup` directly (no arm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsearch.algorithms.continual import ContinualResult, Task, split_by_classes, train_continual
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
from sparsearch.algorithms.quickselection import FeatureSelection, quickselection
from sparsearch.algorithms.sparse_ift import (
    FAMILIES,
    SparseDoped,
    SparseFactorized,
    SparseIFT,
    SparseIFTPlan,
    SparseParallel,
    sparse_ift,
    sparse_ift_arm,
)
from sparsearch.algorithms.spdf import SPDF
from sparsearch.algorithms.static import (
    SNIP,
    GraSP,
    StaticMagnitude,
    StaticRandom,
    StaticSparsifier,
    SynFlow,
)
from sparsearch.engine.sparsifier import Sparsifier
from sparsearch.registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ArmSetting:
    """What a study tells an arm's factory: the target, the budget in steps, the seed and the data.

    ``batch`` is one seeded training batch for arms that score at initialisation (SNIP, GraSP, SynFlow).
    """

    sparsity: float
    total_steps: int
    steps_per_epoch: int
    seed: int
    distribution: str
    batch: Batch | None = None

    def update_every(self, stop: float = 0.75) -> int:
        """The study's mask-update cadence: every 100 steps, or every epoch if shorter, and early enough that a
        short budget still updates before the schedule stops at ``stop`` of training."""
        return max(1, min(100, self.steps_per_epoch, int(stop * self.total_steps) - 1))


ArmFactory = Callable[[ArmSetting], Sparsifier]
ARMS: Registry[ArmFactory] = Registry("study arm", "sparsearch.arms")


@ARMS.register("static-random-uniform")
def _static_random_uniform(setting: ArmSetting) -> Sparsifier:
    return StaticRandom(setting.sparsity, distribution="uniform", seed=setting.seed)


@ARMS.register("static-random-erk")
def _static_random_erk(setting: ArmSetting) -> Sparsifier:
    return StaticRandom(setting.sparsity, distribution="erk", seed=setting.seed)


@ARMS.register("static-magnitude")
def _static_magnitude(setting: ArmSetting) -> Sparsifier:
    return StaticMagnitude(setting.sparsity, distribution=setting.distribution, seed=setting.seed)


@ARMS.register("snip")
def _snip(setting: ArmSetting) -> Sparsifier:
    return SNIP(setting.sparsity, distribution=setting.distribution, seed=setting.seed, batch=setting.batch)


@ARMS.register("grasp")
def _grasp(setting: ArmSetting) -> Sparsifier:
    return GraSP(setting.sparsity, distribution=setting.distribution, seed=setting.seed, batch=setting.batch)


@ARMS.register("synflow")
def _synflow(setting: ArmSetting) -> Sparsifier:
    return SynFlow(setting.sparsity, distribution=setting.distribution, seed=setting.seed, batch=setting.batch)


@ARMS.register("gmp")
def _gmp(setting: ArmSetting) -> Sparsifier:
    return GMP(
        setting.sparsity,
        distribution=setting.distribution,
        total_steps=setting.total_steps,
        update_every=setting.update_every(),
        seed=setting.seed,
    )


@ARMS.register("set")
def _set(setting: ArmSetting) -> Sparsifier:
    return SET(
        setting.sparsity,
        update_every=max(1, setting.steps_per_epoch),
        distribution=setting.distribution,
        seed=setting.seed,
    )


@ARMS.register("rigl")
def _rigl(setting: ArmSetting) -> Sparsifier:
    return RigL(
        setting.sparsity,
        distribution=setting.distribution,
        total_steps=setting.total_steps,
        update_every=setting.update_every(),
        seed=setting.seed,
    )


@ARMS.register("srste")
def _srste(setting: ArmSetting) -> Sparsifier:
    pattern = nm_for_sparsity(setting.sparsity)
    return SRSTE(pattern.n, pattern.m, total_steps=setting.total_steps, incompatible="dense", seed=setting.seed)


@ARMS.register("pgf")
def _pgf(setting: ArmSetting) -> Sparsifier:
    pattern = nm_for_sparsity(setting.sparsity)
    finetune = max(1, int(0.8 * setting.total_steps))
    return PGF(
        pattern.n,
        pattern.m,
        method="mask",
        rate=1.0 / finetune,
        finetune=finetune,
        total_steps=setting.total_steps,
        incompatible="dense",
        seed=setting.seed,
    )


@ARMS.register("imp")
def _imp(setting: ArmSetting) -> Sparsifier:
    phases = 3
    phase_length = setting.total_steps // (phases + 1)
    return IterativeMagnitudePruning(
        setting.sparsity,
        phases=phases,
        total_steps=setting.total_steps,
        rewind_step=min(setting.steps_per_epoch, phase_length // 2),
        distribution=setting.distribution,
        seed=setting.seed,
    )

for _family in FAMILIES:
    ARMS.add(f"sift-{_family}", sparse_ift_arm(_family))

__all__ = [
    "ARMS",
    "GMP",
    "PGF",
    "SET",
    "SNIP",
    "SPDF",
    "SRSTE",
    "ArmFactory",
    "ArmSetting",
    "ContinualResult",
    "DynamicSparsifier",
    "FeatureSelection",
    "GraSP",
    "IterativeMagnitudePruning",
    "PruningResult",
    "RigL",
    "SparseDoped",
    "SparseFactorized",
    "SparseIFT",
    "SparseIFTPlan",
    "SparseParallel",
    "StaticMagnitude",
    "StaticRandom",
    "StaticSparsifier",
    "SynFlow",
    "Task",
    "average_state_dicts",
    "imp",
    "magnitude_prune",
    "nm_for_sparsity",
    "quickselection",
    "sparse_ift",
    "sparse_soup",
    "split_by_classes",
    "train_continual",
]
