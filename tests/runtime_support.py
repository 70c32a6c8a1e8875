"""Shared by the runtime tests: a model's weights zeroed at random, reproducibly."""

import torch
from torch import nn


def sparsify(model: nn.Module, sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    """Zero each weight of every parameter with 2+ dimensions with probability ``sparsity``; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(torch.rand(param.shape, generator=generator) >= sparsity)
    return model.eval()
