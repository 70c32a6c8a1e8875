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

Scorers live in the :data:`SCORERS` registry (entry-point group ``sparsearch.scorers``): a scorer is
``scorer(model, masks, context: ScoringContext) -> Score``; register your own with ``@SCORERS.register("name")``.
None of them looks at the test split. SynFlow and SNIP cost one forward/backward pass per candidate;
short-train costs k training steps plus one validation pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.data.splits import DataSplits
from sparsearch.engine.sparsifier import Sparsifier, StaticMaskSparsifier, default_sparsifiable_parameters
from sparsearch.models.flops import FlopMeter
from sparsearch.registry import Registry
from sparsearch.training import TrainBudget, train


@dataclass(frozen=True)
class ScoringContext:
    """What a scorer may use besides the candidate: the data, the study's budget and the search settings.

    ``batch`` is one seeded training batch (SNIP); ``flop_meter`` counts the scoring cost on the candidate's
    model (built once per candidate with the search's weight positions).
    """

    data: DataSplits
    budget: TrainBudget
    seed: int
    batch_size: int
    short_train_steps: int
    batch: tuple[Tensor, Tensor]
    flop_meter: FlopMeter
    sparse_kernels: bool = False  # short training on the sparse kernels (the study's run-only sparse_kernels key)


@dataclass(frozen=True)
class Score:
    """A candidate's score (higher is better), what breaks ties (higher is better) and its cost in FLOPs."""

    value: float
    flops: int
    tiebreak: float = 0.0
    val_loss: float | None = None


Scorer = Callable[[nn.Module, Mapping[str, Tensor], ScoringContext], Score]
SCORERS: Registry[Scorer] = Registry("scorer", "sparsearch.scorers")


def _masked_parameters(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, nn.Parameter]:
    # the masked weights by module name too, so a head tied to its embedding is found under its own name
    parameters = {**dict(model.named_parameters()), **default_sparsifiable_parameters(model)}
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
    accuracy, _, _ = short_train_evaluation(
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
    sparse_kernels: bool = False,
) -> tuple[float, float, int]:
    """(validation accuracy, validation loss, training FLOPs) after ``steps`` steps with the mask fixed.

    The study's training loop with a step limit, the budget's optimizer at a constant learning rate, batches
    of ``batch_size`` drawn with ``seed`` (so every candidate sees the same batches in the same order), and
    one validation pass at the end; the test split is never evaluated.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"short-train steps must be a positive integer, got {steps!r}")
    short_budget = (budget or TrainBudget()).model_copy(update={"batch_size": batch_size, "lr_schedule": "constant"})
    attached: list[Sparsifier] = []

    def fixed_mask(total_steps: int) -> Sparsifier:
        attached.append(StaticMaskSparsifier(masks, seed=seed))
        return attached[-1]

    result = train(
        model,
        data,
        short_budget,
        seed=seed,
        sparsifier_factory=fixed_mask,
        steps=steps,
        evaluate_after="end",
        test=False,
        sparse_kernels=sparse_kernels,
    )
    attached[0].detach()
    return result.final_val_accuracy, result.final_val_loss, result.train_flops


@SCORERS.register("synflow")
def _synflow(model: nn.Module, masks: Mapping[str, Tensor], context: ScoringContext) -> Score:
    # one sample of ones; the weight gradients are dense
    flops = context.flop_meter.step_flops(1, dense_weight_gradient=True, masks=masks)
    return Score(synflow_score(model, masks, context.data.input_shape), flops)


@SCORERS.register("snip")
def _snip(model: nn.Module, masks: Mapping[str, Tensor], context: ScoringContext) -> Score:
    flops = context.flop_meter.step_flops(len(context.batch[1]), dense_weight_gradient=True, masks=masks)
    return Score(snip_score(model, masks, context.batch), flops)


@SCORERS.register("short-train")
def _short_train(model: nn.Module, masks: Mapping[str, Tensor], context: ScoringContext) -> Score:
    # the forward FLOPs of the validation pass, counted before training changes nothing: the mask is fixed
    validation = len(context.data.y_val) * context.flop_meter.forward(masks).nonzero
    accuracy, loss, train_flops = short_train_evaluation(
        model,
        masks,
        context.data,
        steps=context.short_train_steps,
        batch_size=context.batch_size,
        budget=context.budget,
        seed=context.seed,
        sparse_kernels=context.sparse_kernels,
    )
    # ties (often all candidates at chance level) go to the lower validation loss
    return Score(accuracy, train_flops + validation, tiebreak=-loss, val_loss=loss)
