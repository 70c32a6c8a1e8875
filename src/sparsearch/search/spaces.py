"""Search spaces of sparse sub-networks of a parent network, at a target weight sparsity.

Both spaces mask the same parameters: the weights of every Linear and Conv layer of the parent (biases stay
dense), so "weight sparsity" means the same thing in both: the fraction of those weights that are zero.

- ``WeightSpace``: which connections stay. The per-layer budget comes from a layer-wise distribution
  (uniform, ER, ERK) with exact counts (``sparsearch.sparsity.distribution.layer_keep_counts``): every sample
  keeps exactly ``round((1 - sparsity) * total)`` weights and no layer keeps more than it has; which weights
  within a layer stay is uniformly random.
- ``NodeSpace``: which neurons (channels, for CNNs) of each hidden layer stay; inputs and outputs always stay.
  Removing unit ``i`` of hidden layer ``l`` zeros row ``i`` of layer ``l``'s weight and the columns reading it
  in layer ``l + 1``. Every hidden layer keeps the same fraction ``f`` of its units,
  ``k_l = max(1, round(f * n_l))``; ``f`` is solved exactly over every distinct configuration (all
  breakpoints of the rounding) so that the number of kept weights is the closest possible to
  ``(1 - sparsity) * total`` (ties go to the denser configuration). Which units stay is uniformly random.
  Whole neurons make the achieved sparsity a step function of ``f``: ``NodeSpace.achieved_sparsity`` says
  where it landed: for the default MLP parent within 0.001 of every target in 0.5-0.99, for the default CNN
  (fewer, larger units) within 0.007.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.models.networks import HiddenLayer
from sparsearch.registry import Registry
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


def hidden_layers_of(model: nn.Module) -> list[HiddenLayer]:
    """The model's hidden layers: from ``model.hidden_layers()``, or inferred for a plain chain of Linear layers."""
    if hasattr(model, "hidden_layers"):
        return list(model.hidden_layers())
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    others = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm)
    ]
    chained = all(a.out_features == b.in_features for (_, a), (_, b) in itertools.pairwise(linears))
    if others or len(linears) < 2 or not chained:
        raise TypeError(
            f"NodeSpace needs to know which layers feed which: {type(model).__name__} has no hidden_layers() "
            "method and is not a plain chain of Linear layers; use sparsearch.models.build_model or add "
            "hidden_layers() returning sparsearch.models.HiddenLayer entries"
        )
    return [
        HiddenLayer(f"{name}.weight", f"{next_name}.weight", module.out_features)
        for (name, module), (next_name, _) in itertools.pairwise(linears)
    ]


class NodeSpace:
    """Which hidden neurons (or conv channels) stay: the same keep fraction in every hidden layer.

    Args:
        model: the parent network (from ``build_model``, or a plain chain of Linear layers).
        sparsity: target WEIGHT sparsity in [0, 1); the keep fraction is solved for it (see module doc).
    """

    def __init__(self, model: nn.Module, sparsity: float) -> None:
        self.sparsity = check_sparsity(sparsity)
        self.shapes = {name: tuple(p.shape) for name, p in default_sparsifiable_parameters(model).items()}
        self.hidden = hidden_layers_of(model)
        if not self.hidden:
            raise ValueError("the model has no hidden layers: the node space is empty")
        for layer in self.hidden:
            for name in (layer.producer, layer.consumer):
                if name not in self.shapes:
                    raise ValueError(f"hidden layer refers to {name!r}, which is not a Linear/Conv weight")
        self.keep_fraction, self.kept_units = self._solve_keep_fraction()

    def _kept_weights(self, kept_units: Mapping[str, int]) -> int:
        """Weights that survive when hidden layer producers keep ``kept_units[producer]`` units each."""
        rows = {name: shape[0] for name, shape in self.shapes.items()}
        columns = {name: shape[1] for name, shape in self.shapes.items()}
        for layer in self.hidden:
            rows[layer.producer] = kept_units[layer.producer]
            columns[layer.consumer] = kept_units[layer.producer] * layer.consumer_group
        return sum(rows[name] * columns[name] * math.prod(shape[2:]) for name, shape in self.shapes.items())

    def _units_for_fraction(self, fraction: float) -> dict[str, int]:
        return {layer.producer: max(1, round(fraction * layer.units)) for layer in self.hidden}

    def _solve_keep_fraction(self) -> tuple[float, dict[str, int]]:
        """The fraction whose configuration keeps the number of weights closest to the target budget."""
        total = sum(math.prod(shape) for shape in self.shapes.values())
        target = (1.0 - self.sparsity) * total
        # the configuration only changes where fraction * n_l crosses a half-integer; one candidate fraction
        # between every pair of neighbouring breakpoints enumerates every distinct configuration
        breakpoints = sorted(
            {(j + 0.5) / layer.units for layer in self.hidden for j in range(layer.units)} | {0.0, 1.0}
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
        """Weight sparsity of every sample (whole neurons: close to, not exactly, the target)."""
        total = sum(math.prod(shape) for shape in self.shapes.values())
        return 1.0 - self._kept_weights(self.kept_units) / total

    @property
    def achieved_node_sparsity(self) -> float:
        """Fraction of hidden units removed in every sample."""
        units = sum(layer.units for layer in self.hidden)
        return 1.0 - sum(self.kept_units.values()) / units

    def sample(self, generator: torch.Generator) -> dict[str, Tensor]:
        """Masks of a random structured sub-network: ``kept_units`` random units per hidden layer."""
        masks = {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.shapes.items()}
        for layer in self.hidden:
            keep = torch.zeros(layer.units, dtype=torch.bool)
            keep[torch.randperm(layer.units, generator=generator)[: self.kept_units[layer.producer]]] = True
            producer, consumer = masks[layer.producer], masks[layer.consumer]
            producer &= keep.view(-1, *([1] * (producer.dim() - 1)))
            columns = keep.repeat_interleave(layer.consumer_group)
            consumer &= columns.view(1, -1, *([1] * (consumer.dim() - 2)))
        return masks


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
    """Fraction of hidden units removed: units whose incoming or outgoing weights are all masked.

    Such a unit can be deleted without changing the network's function (a unit with no inputs outputs a
    constant that folds into the next layer's bias). Weights with no mask count as fully kept.
    """
    hidden = hidden_layers_of(model)
    removed = total = 0
    for layer in hidden:
        producer, consumer = masks.get(layer.producer), masks.get(layer.consumer)
        incoming = (
            producer.reshape(layer.units, -1).any(dim=1)
            if producer is not None
            else torch.ones(layer.units, dtype=torch.bool)
        )
        if consumer is not None:
            by_column = consumer.transpose(0, 1).reshape(consumer.shape[1], -1).any(dim=1)
            outgoing = by_column.reshape(layer.units, layer.consumer_group).any(dim=1)
        else:
            outgoing = torch.ones(layer.units, dtype=torch.bool)
        removed += int((~(incoming & outgoing)).sum())
        total += layer.units
    return removed / total


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
