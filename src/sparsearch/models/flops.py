"""Cost of a network: dense and non-zero FLOPs of Linear/Conv layers (one meter for forward passes, training
steps and search scoring), and parameter counts.

A FLOP here is one multiply or one add: a multiply-accumulate counts 2. Only the weights of Linear and Conv
layers are counted (they dominate; biases, activations and pooling are left out), for ONE sample. Non-zero
FLOPs count only multiply-accumulates with a non-zero weight, i.e. what a sparse kernel would execute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsearch.engine.sparsifier import SPARSIFIABLE_MODULES


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass of one sample: with every weight (dense) and with non-zero weights only."""

    dense: int
    nonzero: int


def weight_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """How many times each Linear/Conv weight is applied per sample (1 for Linear, output positions for Conv).

    Keys are weight parameter names (``"layers.0.weight"``). Found by one forward pass of a zero sample.
    """
    positions: dict[str, int] = {}
    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, SPARSIFIABLE_MODULES):
            name = f"{module_name}.weight" if module_name else "weight"

            def record(module: nn.Module, inputs: object, output: torch.Tensor, name: str = name) -> None:
                # output numel / output channels = positions at which each output unit's weights are used
                positions[name] = positions.get(name, 0) + output[0].numel() // output.shape[1]

            handles.append(module.register_forward_hook(record))
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return positions


class FlopMeter:
    """The one FLOP counter: forward FLOPs of one sample from the current (or given) masks, and training FLOPs.

    A training step costs 3 forward passes of the non-zero weights per sample (forward, input-gradient and
    weight-gradient passes), with the dense weight-gradient pass instead where the step needed dense gradients
    (RigL's growth step, SNIP and SynFlow scores). ``total`` accumulates what :meth:`add_step` was told.

    Args:
        model: the network; its Linear/Conv weights are read at every call (so masks applied in place count).
        input_shape: per-sample input shape.
        positions: ``weight_positions(model, input_shape)`` if already known (same for every sub-network).
    """

    def __init__(
        self, model: nn.Module, input_shape: tuple[int, ...], positions: dict[str, int] | None = None
    ) -> None:
        # by module, not by masked parameter: a head tied to its embedding is unmasked but still computes
        weights = {
            f"{module_name}.weight" if module_name else "weight": module.weight
            for module_name, module in model.named_modules()
            if isinstance(module, SPARSIFIABLE_MODULES)
        }
        self.positions = positions if positions is not None else weight_positions(model, input_shape)
        self._layers = [(name, weights[name], uses) for name, uses in self.positions.items()]
        self.dense = sum(2 * uses * weight.numel() for _, weight, uses in self._layers)
        self.total = 0

    def forward(self, masks: Mapping[str, torch.Tensor] | None = None,
                weights: Mapping[str, torch.Tensor] | None = None) -> FlopCount:
        """FLOPs of one forward pass of one sample; a weight with a mask in ``masks`` counts its kept entries, one in
        ``weights`` the non-zeros of the tensor given there (its current values held elsewhere, e.g. the stored
        non-zeros of a layer trained on the sparse kernels), any other its own non-zeros."""
        nonzero = 0
        for name, weight, uses in self._layers:
            if masks is not None and name in masks:
                kept = masks[name]
            else:
                kept = weights[name] if weights is not None and name in weights else weight.detach()
            nonzero += 2 * uses * int(kept.count_nonzero())
        return FlopCount(dense=self.dense, nonzero=nonzero)

    def step_flops(
        self, batch: int, *, dense_weight_gradient: bool = False, masks: Mapping[str, torch.Tensor] | None = None,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> int:
        """FLOPs of one training step (forward and backward) on ``batch`` samples."""
        nonzero = self.forward(masks, weights).nonzero
        return batch * (2 * nonzero + (self.dense if dense_weight_gradient else nonzero))

    def add_step(self, batch: int, *, dense_weight_gradient: bool = False,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Count one training step of the model as it is now (``weights``: see ``forward``)."""
        self.total += self.step_flops(batch, dense_weight_gradient=dense_weight_gradient, weights=weights)


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> FlopCount:
    """Dense and non-zero FLOPs (2 per multiply-accumulate) of one forward pass of one sample."""
    return FlopMeter(model, input_shape).forward()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over all parameters of ``model``."""
    total = nonzero = 0
    for parameter in model.parameters():
        total += parameter.numel()
        nonzero += int(parameter.detach().count_nonzero())
    return total, nonzero
