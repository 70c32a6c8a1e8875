"""Scores that rank candidate sub-networks before full training (higher is better).

- ``synflow``: data-free. The candidate's weights are replaced by their absolute values, masked weights and
  all biases (parameters named ``bias``) set to zero, and R = sum of the outputs for an all-ones input is
  computed in float64. The score is the candidate's total SynFlow saliency, sum over kept weights of
  |w * dR/dw|. Without biases every layer is linear in its weight, so this equals (number of masked layers)
  * R: the signal that flows from the input through the surviving paths; a candidate that cuts every path
  scores 0. (Zeroing the biases is our choice for ranking whole candidates: SynFlow's pruning code takes |b|
  instead, which lets a disconnected candidate score through its biases alone.)
- ``snip``: one training batch; the sum over kept weights of |w * dL/dw| with the mask applied (connection
  sensitivity of the candidate, not of the dense parent).
- ``short-train``: train the candidate for k steps with the mask fixed (``StaticMaskSparsifier``, the budget's
  optimizer at a constant learning rate) and return its accuracy on the VALIDATION split. Short budgets
  often leave several candidates at the same accuracy (at high sparsity, all at chance level): Random Search
  then breaks ties by the lower validation loss.

None of them looks at the test split. SynFlow and SNIP cost one forward/backward pass per candidate;
short-train costs k training steps plus one validation pass.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.data.datasets import DataSplits
from sparsearch.engine.sparsifier import StaticMaskSparsifier
from sparsearch.study.training import (
    TrainBudget,
    batch_order,
    deterministic_algorithms,
    evaluate,
    make_optimizer,
)

SCORERS: tuple[str, ...] = ("synflow", "snip", "short-train")


def _masked_parameters(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    parameters = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(parameters))
    if unknown:
        raise ValueError(f"masks name parameters {unknown} that the model does not have")
    return {name: parameters[name] for name in masks}


def synflow_score(model: nn.Module, masks: Mapping[str, Tensor], input_shape: tuple[int, ...]) -> float:
    """Total SynFlow saliency of the masked candidate (data-free; ``model`` is left unchanged)."""
    network = copy.deepcopy(model).double().eval()
    kept = _masked_parameters(network, masks)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.rpartition(".")[2] == "bias":
                parameter.zero_()
            else:
                parameter.abs_()
        for name, parameter in kept.items():
            parameter.mul_(masks[name].to(parameter.device))
    device = next(network.parameters()).device
    output = network(torch.ones(1, *input_shape, dtype=torch.float64, device=device))
    gradients = torch.autograd.grad(output.sum(), list(kept.values()))
    return float(sum((w.detach() * g).abs().sum() for w, g in zip(kept.values(), gradients, strict=True)))


def snip_score(model: nn.Module, masks: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> float:
    """Sum of |w * dL/dw| over kept weights on ``batch`` with the mask applied (``model`` is left unchanged)."""
    network = copy.deepcopy(model).train()
    kept = _masked_parameters(network, masks)
    with torch.no_grad():
        for name, parameter in kept.items():
            parameter.mul_(masks[name].to(parameter.device))
    device = next(network.parameters()).device
    inputs, targets = batch
    loss = F.cross_entropy(network(inputs.to(device)), targets.to(device))
    gradients = torch.autograd.grad(loss, list(kept.values()))
    return float(sum((w.detach() * g).abs().sum() for w, g in zip(kept.values(), gradients, strict=True)))


def short_train_score(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    data: DataSplits,
    *,
    steps: int,
    batch_size: int = 128,
    budget: TrainBudget | None = None,
    seed: int = 0,
) -> float:
    """Validation accuracy after ``steps`` training steps with the mask fixed (trains ``model`` in place)."""
    accuracy, _ = short_train_evaluation(
        model, masks, data, steps=steps, batch_size=batch_size, budget=budget, seed=seed
    )
    return accuracy


def short_train_evaluation(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    data: DataSplits,
    *,
    steps: int,
    batch_size: int = 128,
    budget: TrainBudget | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """(validation accuracy, validation loss) after ``steps`` training steps with the mask fixed."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"short-train steps must be a positive integer, got {steps!r}")
    budget = budget or TrainBudget()
    optimizer = make_optimizer(model, budget)
    sparsifier = StaticMaskSparsifier(masks, seed=seed).attach(model, optimizer)
    # same seed -> every candidate sees the same batches in the same order
    generator = torch.Generator().manual_seed(seed)
    n_train = len(data.y_train)
    device = next(model.parameters()).device
    done = 0
    model.train()
    with deterministic_algorithms():
        while done < steps:
            for indices in batch_order(n_train, batch_size, generator):
                inputs, targets = data.x_train[indices].to(device), data.y_train[indices].to(device)
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
        accuracy, loss = evaluate(model, data.x_val, data.y_val)
    sparsifier.detach()
    return accuracy, loss
