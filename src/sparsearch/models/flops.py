"""Cost of a forward pass: dense and non-zero FLOPs of Linear/Conv layers, and parameter counts.

A FLOP here is one multiply or one add: a multiply-accumulate counts 2. Only the weights of Linear and Conv
layers are counted (they dominate; biases, activations and pooling are left out), for ONE sample. Non-zero
FLOPs count only multiply-accumulates with a non-zero weight, i.e. what a sparse kernel would execute.
"""

from __future__ import annotations

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


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> FlopCount:
    """Dense and non-zero FLOPs (2 per multiply-accumulate) of one forward pass of one sample."""
    weights = dict(model.named_parameters())
    dense = nonzero = 0
    for name, uses in weight_positions(model, input_shape).items():
        weight = weights[name]
        dense += 2 * uses * weight.numel()
        nonzero += 2 * uses * int(weight.detach().count_nonzero())
    return FlopCount(dense=dense, nonzero=nonzero)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over all parameters of ``model``."""
    total = nonzero = 0
    for parameter in model.parameters():
        total += parameter.numel()
        nonzero += int(parameter.detach().count_nonzero())
    return total, nonzero
