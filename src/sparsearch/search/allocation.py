"""The layer-wise allocation space, and mutations fitted to each built-in space (for evolution).

``AllocationSpace``: how many weights each layer keeps, with the global budget fixed. Every sample keeps
exactly ``round((1 - sparsity) * total)`` weights; which weights within a layer stay is uniformly random. A
sample's allocation is the space's base distribution (ERK by default, the weight space's) tilted by one factor
per layer, ``density_l ∝ base_l * exp(z_l)`` with ``z_l`` uniform in ``[-log(spread), log(spread)]``,
water-filled so that no layer exceeds density 1 and the total is exact; every layer keeps at least one weight.
This is the space where published search beats uniform allocation (OWL, EvoPress); its mutation moves kept
weights from one layer to another with the total fixed, as EvoPress moves sparsity levels between layers.

Mutations (``mutate(space, masks, generator)``) keep what defines a space fixed:
- node space: swap one kept unit with one removed unit of a random hidden layer (kept units per layer fixed);
- weight space: swap a few kept and removed positions inside a random layer (per-layer counts fixed);
- allocation space: move kept weights from one layer to another (global count fixed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.search.spaces import SPACES, NodeSpace, SearchSpace, WeightSpace
from sparsearch.sparsity.distribution import DISTRIBUTIONS, check_sparsity, layer_densities
from sparsearch.sparsity.masks import topk_mask

DEFAULT_SPREAD = 4.0
MUTATION_FRACTION = 0.1  # share of a layer's kept weights that one mutation moves (allocation) or swaps (weight)


class AllocationSpace:
    """Per-layer densities with the global number of kept weights fixed; random positions within a layer.

    Args:
        model: the parent network (its Linear/Conv weights are the masked parameters).
        sparsity: target weight sparsity in [0, 1); every sample meets it exactly (up to one weight).
        distribution: the base allocation that samples are drawn around ("uniform", "er", "erk").
        spread: a layer's density is the base density times a factor in [1/spread, spread] before the total
            is rescaled to the budget.
    """

    def __init__(
        self, model: nn.Module, sparsity: float, distribution: str = "erk", spread: float = DEFAULT_SPREAD
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        if not (isinstance(spread, int | float) and math.isfinite(spread) and spread >= 1.0):
            raise ValueError(f"spread must be a finite number >= 1, got {spread!r}")
        self.distribution = distribution
        self.spread = float(spread)
        self.shapes = {name: tuple(p.shape) for name, p in default_sparsifiable_parameters(model).items()}
        if not self.shapes:
            raise ValueError("the model has no Linear or Conv layers: the allocation space is empty")
        self.sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.total_keep = round((1.0 - self.sparsity) * sum(self.sizes.values()))
        if self.total_keep < len(self.shapes):
            raise ValueError(
                f"sparsity {sparsity} keeps {self.total_keep} weights, fewer than one per layer "
                f"({len(self.shapes)} layers)"
            )
        self.base_densities = layer_densities(self.shapes, self.sparsity, distribution)

    @property
    def layers(self) -> tuple[str, ...]:
        """The masked weights, in model order (one allocation coordinate each)."""
        return tuple(self.shapes)

    @property
    def log_spread(self) -> float:
        """Bound of a layer's log-factor ``z_l``: samples and TPE draw it from [-log_spread, log_spread]."""
        return math.log(self.spread)

    @property
    def achieved_sparsity(self) -> float:
        """Weight sparsity of every sample (exact counts)."""
        return 1.0 - self.total_keep / sum(self.sizes.values())

    def counts_from_logits(self, logits: Mapping[str, float]) -> dict[str, int]:
        """Kept weights per layer for log-factors ``logits`` (one per layer); they sum to ``total_keep``."""
        missing = set(self.shapes) - set(logits)
        if missing:
            raise ValueError(f"allocation logits miss layers {sorted(missing)}")
        weights = {name: self.base_densities[name] * math.exp(float(logits[name])) for name in self.shapes}
        # water-filling: scale the free layers to the remaining budget; a layer above density 1 becomes full
        full: set[str] = set()
        while True:
            free = [name for name in self.shapes if name not in full]
            remaining = self.total_keep - sum(self.sizes[name] for name in full)
            scale = remaining / sum(weights[name] * self.sizes[name] for name in free)
            over = [name for name in free if weights[name] * scale >= 1.0]
            if not over or len(over) == len(free):
                break
            full.update(over)
        exact = {
            name: self.sizes[name] if name in full else weights[name] * scale * self.sizes[name] for name in self.shapes
        }
        counts = {name: max(1, min(self.sizes[name], math.floor(exact[name]))) for name in self.shapes}
        # largest remainder to hit the total exactly, never below 1 or above a layer's size
        order = sorted(self.shapes, key=lambda name: exact[name] - math.floor(exact[name]), reverse=True)
        shortfall = self.total_keep - sum(counts.values())
        while shortfall != 0:
            step = 1 if shortfall > 0 else -1
            candidates = [n for n in (order if step > 0 else reversed(order)) if 1 <= counts[n] + step <= self.sizes[n]]
            if step < 0:  # take from the layers that keep the most
                candidates.sort(key=lambda n: counts[n], reverse=True)
            for name in candidates[: abs(shortfall)]:
                counts[name] += step
                shortfall -= step
        return counts

    def masks_for_counts(self, counts: Mapping[str, int], position_scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Masks keeping ``counts[l]`` weights of each layer: those with the highest ``position_scores``."""
        if sum(counts.values()) != self.total_keep:
            raise ValueError(f"counts sum to {sum(counts.values())}, the space keeps exactly {self.total_keep}")
        return {name: topk_mask(position_scores[name], int(counts[name])) for name in self.shapes}

    def position_scores(self, generator: torch.Generator) -> dict[str, Tensor]:
        """Uniform random scores per weight; top-k of them is a uniformly random choice of k positions."""
        return {name: torch.rand(shape, generator=generator) for name, shape in self.shapes.items()}

    def sample_logits(self, generator: torch.Generator) -> dict[str, float]:
        """One log-factor per layer, uniform in [-log_spread, log_spread]."""
        values = (torch.rand(len(self.shapes), generator=generator, dtype=torch.float64) * 2 - 1) * self.log_spread
        return {name: float(value) for name, value in zip(self.shapes, values, strict=True)}

    def sample(self, generator: torch.Generator) -> dict[str, Tensor]:
        """A random allocation around the base distribution, random positions within each layer."""
        counts = self.counts_from_logits(self.sample_logits(generator))
        return self.masks_for_counts(counts, self.position_scores(generator))

    def counts(self, masks: Mapping[str, Tensor]) -> dict[str, int]:
        """Kept weights per layer of a sample."""
        return {name: int(masks[name].count_nonzero()) for name in self.shapes}

    def mutate(self, masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Move kept weights from one random layer to another (a tenth of the donor's), total unchanged."""
        counts = self.counts(masks)
        donors = [name for name in self.shapes if counts[name] > 1]
        receivers = [name for name in self.shapes if counts[name] < self.sizes[name]]
        pairs = [(d, r) for d in donors for r in receivers if d != r]
        if not pairs:
            return {name: mask.clone() for name, mask in masks.items()}
        donor, receiver = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        amount = max(1, round(MUTATION_FRACTION * counts[donor]))
        amount = min(amount, counts[donor] - 1, self.sizes[receiver] - counts[receiver])
        result = {name: mask.clone() for name, mask in masks.items()}
        _flip(result[donor], True, amount, generator)
        _flip(result[receiver], False, amount, generator)
        return result


def _flip(mask: Tensor, value: bool, amount: int, generator: torch.Generator) -> None:
    """Flip ``amount`` random entries of ``mask`` that equal ``value`` (in place)."""
    flat = mask.view(-1)
    positions = (flat == value).nonzero().view(-1)
    chosen = positions[torch.randperm(len(positions), generator=generator)[:amount]]
    flat[chosen] = not value


def _mutate_weight(space: WeightSpace, masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    layers = [name for name in space.shapes if 0 < space.keep_counts[name] < math.prod(space.shapes[name])]
    result = {name: mask.clone() for name, mask in masks.items()}
    if not layers:
        return result
    name = layers[int(torch.randint(len(layers), (1,), generator=generator))]
    kept = space.keep_counts[name]
    amount = max(1, min(round(MUTATION_FRACTION * kept), kept, math.prod(space.shapes[name]) - kept))
    _flip(result[name], True, amount, generator)  # drop some kept positions ...
    # ... and keep as many positions that were removed before (not the ones just dropped)
    candidates = (~masks[name].reshape(-1)).nonzero().view(-1)
    result[name].view(-1)[candidates[torch.randperm(len(candidates), generator=generator)[:amount]]] = True
    return result


def _mutate_node(space: NodeSpace, masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    keeps = space.kept_units_of(masks)
    layers = [group.name for group in space.groups if 0 < int(keeps[group.name].sum()) < group.units]
    if not layers:
        return {name: mask.clone() for name, mask in masks.items()}
    name = layers[int(torch.randint(len(layers), (1,), generator=generator))]
    keep = keeps[name]
    kept, removed = keep.nonzero().view(-1), (~keep).nonzero().view(-1)
    keep[kept[int(torch.randint(len(kept), (1,), generator=generator))]] = False
    keep[removed[int(torch.randint(len(removed), (1,), generator=generator))]] = True
    return space.masks_keeping(keeps)


def mutate(space: SearchSpace, masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """A small random change of ``masks`` that stays in ``space`` (see the module doc for each space).

    A space of your own supports evolution by defining ``mutate(masks, generator)``.
    """
    if isinstance(space, NodeSpace):
        return _mutate_node(space, masks, generator)
    if isinstance(space, WeightSpace):
        return _mutate_weight(space, masks, generator)
    own = getattr(space, "mutate", None)
    if callable(own):
        return own(masks, generator)
    raise TypeError(
        f"{type(space).__name__} has no mutation: evolution needs a node, weight or allocation space, or a space "
        "with a mutate(masks, generator) method"
    )


def can_mutate(space: SearchSpace) -> bool:
    """Whether :func:`mutate` knows how to change samples of ``space``."""
    return isinstance(space, NodeSpace | WeightSpace) or callable(getattr(space, "mutate", None))


@SPACES.register("allocation")
def _allocation_space(model: nn.Module, sparsity: float, *, distribution: str = "erk") -> SearchSpace:
    return AllocationSpace(model, sparsity, distribution)
