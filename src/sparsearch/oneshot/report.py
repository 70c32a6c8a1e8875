"""What a one-shot pruning run reports: per layer target vs actual sparsity, reconstruction error, time."""

from __future__ import annotations

from pydantic import BaseModel


class LayerReport(BaseModel):
    """One pruned weight matrix. ``reconstruction_error`` is ||WX - W'X||^2 / ||WX||^2 on its calibration inputs."""

    name: str
    shape: tuple[int, int]
    target_sparsity: float
    actual_sparsity: float
    zeros: int
    reconstruction_error: float
    dsnot_swaps: int
    seconds: float


class PruneReport(BaseModel):
    """A whole run. Sparsity means the fraction of zero weights among the pruned layers' weights.

    ``owl_outlier_ratios``: with OWL, each block's share of outlier scores in the dense model (block order).
    """

    method: str
    dsnot: bool
    pattern: str | None
    budget: str
    target_sparsity: float
    actual_sparsity: float
    pruned_parameters: int
    zero_parameters: int
    calibration_windows: int
    calibration_tokens: int
    mean_reconstruction_error: float
    seconds: float
    layers: list[LayerReport]
    owl_outlier_ratios: list[float] | None = None

    @classmethod
    def from_layers(cls, layers: list[LayerReport], seconds: float, **run: object) -> PruneReport:
        """Totals computed from the per-layer rows."""
        sizes = [layer.shape[0] * layer.shape[1] for layer in layers]
        zeros = sum(layer.zeros for layer in layers)
        total = sum(sizes)
        return cls(
            **run,
            actual_sparsity=zeros / total if total else 0.0,
            pruned_parameters=total,
            zero_parameters=zeros,
            mean_reconstruction_error=sum(layer.reconstruction_error for layer in layers) / max(len(layers), 1),
            seconds=seconds,
            layers=layers,
        )
