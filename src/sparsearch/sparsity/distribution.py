"""How a total weight budget splits across layers: uniform, ER, ERK and custom densities, with exact counts.

"Sparsity" is always the fraction of zero weights among the masked parameters (all layers together).
Every function here returns exact integer keep-counts whose sum equals ``round((1 - sparsity) * total)``,
so a model built from them has exactly the target number of non-zeros (RigL's convention), and no layer is
ever asked to keep more weights than it has.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence

from sparsearch.registry import Registry

DensityRule = Callable[[Sequence[int]], float]
# rule(layer shape) -> relative density before scaling; register yours with @DISTRIBUTIONS.register("name")
DISTRIBUTIONS: Registry[DensityRule] = Registry("distribution", "sparsearch.distributions")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float if it lies in [0, 1), else raise a ValueError naming it."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1) (fraction of zero weights), got {sparsity!r}")
    return value


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


@DISTRIBUTIONS.register("uniform")
def _uniform(shape: Sequence[int]) -> float:
    """Every layer keeps the same fraction."""
    return 1.0


@DISTRIBUTIONS.register("er")
def _erdos_renyi(shape: Sequence[int]) -> float:
    """Erdős-Rényi: (n_out + n_in) / (n_out * n_in), kernel dimensions folded into n_in."""
    n_out, n_in = int(shape[0]), _numel(shape[1:])
    return (n_out + n_in) / (n_out * n_in)


@DISTRIBUTIONS.register("erk")
def _erdos_renyi_kernel(shape: Sequence[int]) -> float:
    """Erdős-Rényi-Kernel: the sum of all dimensions over their product."""
    return sum(shape) / _numel(shape)


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "uniform",
    dense_layers: Collection[str] = (),
) -> dict[str, float]:
    """Per-layer densities (fractions kept) whose parameter-weighted mean is ``1 - sparsity``.

    ``dense_layers`` are kept fully dense and count towards the budget. ER/ERK layers whose scaled density
    would exceed 1 become dense and the rest is solved again (iterated until no layer exceeds 1).
    """
    sparsity = check_sparsity(sparsity)
    density_rule = DISTRIBUTIONS.get(distribution)
    if not shapes:
        raise ValueError("no layers to sparsify: the shapes mapping is empty")
    unknown = set(dense_layers) - set(shapes)
    if unknown:
        raise ValueError(f"dense_layers names unknown layers {sorted(unknown)}; known: {sorted(shapes)}")
    sizes = {name: _numel(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    budget = (1.0 - sparsity) * total
    dense = set(dense_layers)
    while True:
        free = [name for name in shapes if name not in dense]
        remaining = budget - sum(sizes[name] for name in dense)
        if remaining < -1e-9 * total:
            raise ValueError(
                f"sparsity {sparsity} is unreachable: the dense layers {sorted(dense)} alone hold more than "
                f"{1 - sparsity:.4f} of the weights"
            )
        if not free:
            break
        raw = {name: density_rule(shapes[name]) for name in free}
        epsilon = max(remaining, 0.0) / sum(raw[name] * sizes[name] for name in free)
        too_dense = [name for name in free if epsilon * raw[name] > 1.0]
        if not too_dense:
            break
        dense.update(too_dense)
    densities = {name: 1.0 for name in dense}
    densities.update({name: epsilon * raw[name] for name in free})
    return {name: densities[name] for name in shapes}


def keep_counts_from_densities(
    shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float], total_keep: int | None = None
) -> dict[str, int]:
    """Integer keep-counts per layer following ``densities`` and summing exactly to ``total_keep``.

    Each layer gets floor(density * size); the remainder goes to the layers with the largest fractional
    parts (largest-remainder rounding), never above a layer's size.
    """
    sizes = {name: _numel(shape) for name, shape in shapes.items()}
    for name, density in densities.items():
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density of layer {name!r} must be in [0, 1], got {density}")
    exact = {name: densities[name] * sizes[name] for name in shapes}
    if total_keep is None:
        total_keep = round(sum(exact.values()))
    if not 0 <= total_keep <= sum(sizes.values()):
        raise ValueError(f"total_keep must be in [0, {sum(sizes.values())}], got {total_keep}")
    counts = {name: min(sizes[name], math.floor(exact[name])) for name in shapes}
    shortfall = total_keep - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda name: exact[name] - math.floor(exact[name]), reverse=True)
    while shortfall > 0:
        progressed = False
        for name in by_remainder:
            if shortfall == 0:
                break
            if counts[name] < sizes[name]:
                counts[name] += 1
                shortfall -= 1
                progressed = True
        if not progressed:
            break
    while shortfall < 0:
        for name in reversed(by_remainder):
            if shortfall == 0:
                break
            if counts[name] > 0:
                counts[name] -= 1
                shortfall += 1
    return counts


def layer_keep_counts(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "uniform",
    dense_layers: Collection[str] = (),
) -> dict[str, int]:
    """Exact number of weights to keep per layer; the counts sum to ``round((1 - sparsity) * total)``."""
    densities = layer_densities(shapes, sparsity, distribution, dense_layers)
    total = sum(_numel(shape) for shape in shapes.values())
    return keep_counts_from_densities(shapes, densities, round((1.0 - sparsity) * total))


def custom_keep_counts(
    shapes: Mapping[str, Sequence[int]], layer_sparsities: Mapping[str, float]
) -> dict[str, int]:
    """Keep-counts from a user-given sparsity per layer (layers not named stay dense)."""
    unknown = set(layer_sparsities) - set(shapes)
    if unknown:
        raise ValueError(f"custom distribution names unknown layers {sorted(unknown)}; known: {sorted(shapes)}")
    densities = {
        name: 1.0 - check_sparsity(layer_sparsities[name], f"sparsity of layer {name!r}")
        if name in layer_sparsities
        else 1.0
        for name in shapes
    }
    return {name: round(densities[name] * _numel(shape)) for name, shape in shapes.items()}
