"""Search spaces of sparse sub-networks of a parent network, at a target weight sparsity.

Both spaces mask the same parameters: the weights of every Linear and Conv layer of the parent (biases stay
dense), so "weight sparsity" means the same thing in both: the fraction of those weights that are zero.

- ``WeightSpace``: which connections stay. The per-layer budget comes from a layer-wise distribution
  (uniform, ER, ERK) with exact counts (``sparsearch.sparsity.distribution.layer_keep_counts``): every sample
  keeps exactly ``round((1 - sparsity) * total)`` weights and no layer keeps more than it has; which weights
  within a layer stay is uniformly random.
- ``NodeSpace``: which units (neurons, channels) stay, on any model ``torch.fx`` can trace. The unit groups
  come from ``sparsearch.search.units.find_unit_groups``: a group is a set of units removed together (one
  layer's outputs, or every layer feeding one residual stream, with its BatchNorms); removing unit ``i``
  zeros row ``i`` of every producer in the group and the columns reading it in every consumer. Units the
  analysis cannot pair (the model's output, inputs of attention or LayerNorm, tied weights, ...) all stay;
  ``NodeSpace.notes`` names each such layer and why. Every group keeps the same fraction ``f`` of its
  units, ``k_g = max(1, round(f * n_g))``; ``f`` is solved exactly over every distinct configuration (all
  breakpoints of the rounding) so that the number of kept weights is the closest possible to
  ``(1 - sparsity) * total`` (ties go to the denser configuration). Which units stay is uniformly random.
  Whole units make the achieved sparsity a step function of ``f``: ``NodeSpace.achieved_sparsity`` says
  where it landed (``benchmarks/results/node_space_exactness.md``): for the default MLP parent within 0.001
  of every target in 0.5-0.99, for the default CNN (fewer, larger units) within 0.007, for a ResNet-20
  within 0.006 and a ResNet-18-width net within 0.001.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.registry import Registry
from sparsearch.search.units import UnitGroup, UnitSlot, find_unit_groups
from sparsearch.sparsity.distribution import DISTRIBUTIONS, check_sparsity, layer_keep_counts
from sparsearch.sparsity.masks import mask_sparsity, random_mask

SpaceFactory = Callable[..., "SearchSpace"]
# factory(model, sparsity, *, distribution) -> SearchSpace; register your own with @SPACES.register("name")
SPACES: Registry[SpaceFactory] = Registry("search space", "sparsearch.spaces")


@runtime_checkable
class SearchSpace(Protocol):
    """A set of sparse sub-networks of one parent; ``sample`` draws one as boolean masks (True = kept)."""

    sparsity: float

    def sample(self, generator: torch.Generator) -> dict[str, Tensor]: ...


class WeightSpace:
    """Which connections stay: exact per-layer counts from a distribution, random positions within a layer.

    Args:
        model: the parent network (its Linear/Conv weights are the masked parameters).
        sparsity: target weight sparsity in [0, 1).
        distribution: "uniform", "er" or "erk".
    """

    def __init__(self, model: nn.Module, sparsity: float, distribution: str = "erk") -> None:
        self.sparsity = check_sparsity(sparsity)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        self.distribution = distribution
        self.shapes = {name: tuple(p.shape) for name, p in default_sparsifiable_parameters(model).items()}
        if not self.shapes:
            raise ValueError("the model has no Linear or Conv layers: the weight space is empty")
        self.keep_counts = layer_keep_counts(self.shapes, self.sparsity, distribution)

    @property
    def achieved_sparsity(self) -> float:
        """Weight sparsity of every sample (exact counts: the target up to one weight)."""
        total = sum(math.prod(shape) for shape in self.shapes.values())
        return 1.0 - sum(self.keep_counts.values()) / total

    def sample(self, generator: torch.Generator) -> dict[str, Tensor]:
        """Masks keeping ``keep_counts[name]`` uniformly random weights of every layer."""
        return {name: random_mask(shape, self.keep_counts[name], generator) for name, shape in self.shapes.items()}


class NodeSpace:
    """Which units (neurons, channels) stay: the same keep fraction in every removable unit group.

    The groups come from :func:`sparsearch.search.units.find_unit_groups` (any model ``torch.fx`` can trace;
    channels tied by a residual add are one group). Layers it cannot pair keep all their units; ``notes``
    says which and why.

    Args:
        model: the parent network.
        sparsity: target WEIGHT sparsity in [0, 1); the keep fraction is solved for it (see module doc).
    """

    def __init__(self, model: nn.Module, sparsity: float) -> None:
        self.sparsity = check_sparsity(sparsity)
        self.shapes = {name: tuple(p.shape) for name, p in default_sparsifiable_parameters(model).items()}
        if not self.shapes:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv layers: the node space is empty")
        analysis = find_unit_groups(model)
        self.groups: tuple[UnitGroup, ...] = analysis.groups
        self.notes: tuple[str, ...] = analysis.notes
        if not self.groups:
            raise ValueError(
                f"no unit of {type(model).__name__} can be removed: the node space is empty ({'; '.join(self.notes)})"
            )
        self.keep_fraction, self.kept_units = self._solve_keep_fraction()

    def _kept_weights(self, kept_units: Mapping[str, int]) -> int:
        """Weights that survive when every group keeps ``kept_units[group.name]`` units."""
        removed_rows = dict.fromkeys(self.shapes, 0)
        removed_columns = dict.fromkeys(self.shapes, 0)
        for group in self.groups:
            removed = group.units - kept_units[group.name]
            for slot in group.producers:
                removed_rows[slot.parameter] += removed
            for slot in group.consumers:
                removed_columns[slot.parameter] += removed * slot.block
        return sum(
            (shape[0] - removed_rows[name]) * (shape[1] - removed_columns[name]) * math.prod(shape[2:])
            for name, shape in self.shapes.items()
        )

    def _units_for_fraction(self, fraction: float) -> dict[str, int]:
        return {group.name: max(1, round(fraction * group.units)) for group in self.groups}

    def _solve_keep_fraction(self) -> tuple[float, dict[str, int]]:
        """The fraction whose configuration keeps the number of weights closest to the target budget."""
        total = sum(math.prod(shape) for shape in self.shapes.values())
        target = (1.0 - self.sparsity) * total
        # the configuration only changes where fraction * n_g crosses a half-integer; one candidate fraction
        # between every pair of neighbouring breakpoints enumerates every distinct configuration
        breakpoints = sorted(
            {(j + 0.5) / group.units for group in self.groups for j in range(group.units)} | {0.0, 1.0}
        )
        candidates = [(a + b) / 2 for a, b in itertools.pairwise(breakpoints)] + [1.0]
        best: tuple[float, float, dict[str, int]] | None = None
        for fraction in candidates:
            units = self._units_for_fraction(fraction)
            error = abs(self._kept_weights(units) - target)
            # strict "<" while walking up in fraction would prefer the sparser one; "<=" prefers the denser
            if best is None or error <= best[0]:
                best = (error, fraction, units)
        assert best is not None
        return best[1], best[2]

    @property
    def achieved_sparsity(self) -> float:
        """Weight sparsity of every sample (whole units: close to, not exactly, the target)."""
        total = sum(math.prod(shape) for shape in self.shapes.values())
        return 1.0 - self._kept_weights(self.kept_units) / total

    @property
    def achieved_node_sparsity(self) -> float:
        """Fraction of the removable units removed in every sample."""
        units = sum(group.units for group in self.groups)
        return 1.0 - sum(self.kept_units.values()) / units

    def sample(self, generator: torch.Generator) -> dict[str, Tensor]:
        """Masks of a random structured sub-network: ``kept_units`` random units per group."""
        keeps = {}
        for group in self.groups:
            keep = torch.zeros(group.units, dtype=torch.bool)
            keep[torch.randperm(group.units, generator=generator)[: self.kept_units[group.name]]] = True
            keeps[group.name] = keep
        return self.masks_keeping(keeps)

    def masks_keeping(self, keeps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The masks that keep unit ``i`` of group ``g`` where ``keeps[g.name][i]`` (a group not named keeps all)."""
        masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.shapes.items()}
        for group in self.groups:
            if group.name not in keeps:
                continue
            keep = keeps[group.name]
            for slot in group.producers:
                rows = masks[slot.parameter][slot.offset : slot.offset + group.units]
                rows &= keep.view(-1, *([1] * (rows.dim() - 1)))
            for slot in group.consumers:
                mask = masks[slot.parameter]
                columns = mask[:, slot.offset : slot.offset + group.units * slot.block]
                columns &= keep.repeat_interleave(slot.block).view(1, -1, *([1] * (mask.dim() - 2)))
        return masks

    def kept_units_of(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Which units of each group ``masks`` keep (a unit is kept where its first producer row is not all zero)."""
        keeps = {}
        for group in self.groups:
            slot = group.producers[0]
            rows = masks[slot.parameter][slot.offset : slot.offset + group.units]
            keeps[group.name] = rows.reshape(group.units, -1).any(dim=1)
        return keeps


@SPACES.register("node")
def _node_space(model: nn.Module, sparsity: float, *, distribution: str = "erk") -> SearchSpace:
    return NodeSpace(model, sparsity)


@SPACES.register("weight")
def _weight_space(model: nn.Module, sparsity: float, *, distribution: str = "erk") -> SearchSpace:
    return WeightSpace(model, sparsity, distribution)


def make_space(name: str, model: nn.Module, sparsity: float, *, distribution: str = "erk") -> SearchSpace:
    """The search space registered as ``name`` in :data:`SPACES`; ``distribution`` is for spaces that use one."""
    return SPACES.get(name)(model, sparsity, distribution=distribution)


def weight_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of masked weights that are zero (all masks together)."""
    return mask_sparsity(masks)


def node_sparsity(model: nn.Module, masks: Mapping[str, Tensor]) -> float:
    """Fraction of removable units removed: units whose incoming or outgoing weights are all masked.

    Such a unit can be deleted without changing the network's function (a unit with no inputs outputs a
    constant that folds into the next layer's bias). The units are those of ``find_unit_groups(model)``'s
    groups (a residual group counts each channel once: removed when all its producers' rows or all its
    consumers' columns are masked); weights with no mask count as fully kept. NaN when the model has no
    removable unit (untraceable, or every layer kept whole).
    """
    groups = find_unit_groups(model).groups
    removed = total = 0
    for group in groups:
        incoming = torch.zeros(group.units, dtype=torch.bool)
        outgoing = torch.zeros(group.units, dtype=torch.bool)
        for slot in group.producers:
            mask = masks.get(slot.parameter)
            rows = _units_with_inputs(mask, slot, group.units)
            incoming |= rows if rows is not None else True
        for slot in group.consumers:
            columns = _units_with_outputs(masks.get(slot.parameter), slot, group.units)
            outgoing |= columns if columns is not None else True
        if not group.consumers:
            outgoing[:] = True  # nothing reads them: only their inputs can cut them off
        removed += int((~(incoming & outgoing)).sum())
        total += group.units
    return removed / total if total else math.nan


def _units_with_inputs(mask: Tensor | None, slot: UnitSlot, units: int) -> Tensor | None:
    """Per unit: does its producer row in ``mask`` keep any weight (None without a mask)."""
    if mask is None:
        return None
    return mask[slot.offset : slot.offset + units].reshape(units, -1).any(dim=1).cpu()


def _units_with_outputs(mask: Tensor | None, slot: UnitSlot, units: int) -> Tensor | None:
    """Per unit: do its consumer columns in ``mask`` keep any weight (None without a mask)."""
    if mask is None:
        return None
    columns = mask[:, slot.offset : slot.offset + units * slot.block].transpose(0, 1)
    return columns.reshape(units, -1).any(dim=1).cpu()


@torch.no_grad()
def rescale_to_fan_in(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Sparsity-aware initialisation: scale each unit's kept weights by sqrt(dense fan-in / kept fan-in).

    A sub-network inherits the parent's initial weights, drawn for the parent's fan-in; with fewer inputs
    kept, every layer's pre-activations shrink by about sqrt(density) and the signal fades with depth. This
    restores each unit's initial pre-activation variance (Evci et al. 2022, "Gradient flow in sparse neural
    networks"). Units with no kept input stay as they are. Call it on the fresh parent, before training.
    """
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters:
            raise ValueError(f"mask names parameter {name!r}, which the model does not have")
        weight = parameters[name]
        kept = mask.reshape(weight.shape[0], -1).to(weight.device)
        fan_in = kept.sum(dim=1).to(weight.dtype)
        scale = torch.where(fan_in > 0, (kept.shape[1] / fan_in.clamp(min=1)).sqrt(), torch.ones_like(fan_in))
        weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))
