"""Scores: how important each weight is (higher = keep). Magnitude, random, gradient, SNIP, GraSP, SynFlow.

Every scorer returns ``{parameter name: score tensor of the parameter's shape}`` and leaves the model as it
found it: no ``.grad`` is written, buffers (BatchNorm statistics) and the train/eval mode are restored.
Data-dependent scores take one ``batch = (inputs, targets)`` and a loss function (cross-entropy by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsearch.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

ScoreFn = Callable[..., dict[str, torch.Tensor]]
# score(model, params, *, batch, loss_fn, generator, input_shape) -> {name: scores}; @SCORES.register("name")
SCORES: Registry[ScoreFn] = Registry("score", "sparsearch.weight_scores")


@contextmanager
def _model_untouched(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Restore the model's mode and buffers after scoring (a forward pass may update BatchNorm statistics)."""
    was_training = model.training
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    if training is not None:
        model.train(training)
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])


def _check_batch(batch: Batch | None, score: str) -> Batch:
    if batch is None:
        raise ValueError(f"the {score!r} score needs a data batch: pass batch=(inputs, targets)")
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def magnitude_scores(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w|."""
    return {name: p.detach().abs() for name, p in params.items()}


def random_scores(params: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform random scores (a random mask with the distribution's exact counts)."""
    return {name: torch.rand(p.shape, generator=generator).to(p.device) for name, p in params.items()}


def _loss_gradients(
    model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, loss_fn: LossFn, create_graph: bool = False
) -> tuple[torch.Tensor, ...]:
    inputs, targets = batch
    loss = loss_fn(model(inputs), targets)
    return torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)


def gradient_scores(
    model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, loss_fn: LossFn = F.cross_entropy
) -> dict[str, torch.Tensor]:
    """|dL/dw| on one batch."""
    batch = _check_batch(batch, "gradient")
    with _model_untouched(model):
        grads = _loss_gradients(model, params, batch, loss_fn)
    return {name: g.detach().abs() for name, g in zip(params, grads, strict=True)}


def snip_scores(
    model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, loss_fn: LossFn = F.cross_entropy
) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): connection sensitivity |w * dL/dw| on one batch."""
    batch = _check_batch(batch, "snip")
    with _model_untouched(model):
        grads = _loss_gradients(model, params, batch, loss_fn)
    return {name: (p.detach() * g).abs() for (name, p), g in zip(params.items(), grads, strict=True)}


def grasp_scores(
    model: nn.Module, params: Mapping[str, torch.Tensor], batch: Batch, loss_fn: LossFn = F.cross_entropy
) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020) as a keep-score: w * (H g).

    GraSP's Algorithm 1 computes S = -w * (H g) and keeps the weights with S below the percentile, i.e. it
    removes the largest S; keeping the largest ``w * (H g)`` is the same rule. One batch, temperature 1.
    """
    batch = _check_batch(batch, "grasp")
    # the Hessian-gradient product differentiates twice; the fused attention kernels have no double backward
    with _model_untouched(model), sdpa_kernel(SDPBackend.MATH):
        first = [g.detach() for g in _loss_gradients(model, params, batch, loss_fn)]
        second = _loss_gradients(model, params, batch, loss_fn, create_graph=True)
        gradient_dot = sum((g * g0).sum() for g, g0 in zip(second, first, strict=True))
        hessian_gradient = torch.autograd.grad(gradient_dot, list(params.values()))
    return {name: p.detach() * hg for (name, p), hg in zip(params.items(), hessian_gradient, strict=True)}


def synflow_scores(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    input_shape: tuple[int, ...],
    masks: Mapping[str, torch.Tensor] | None = None,
    token_inputs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020), one round: |w * dR/dw|, R = sum of outputs of the |w| network on ones.

    Data-free. Runs in float64 in eval mode on a functional copy (the model's tensors are not modified);
    ``masks`` zero already-pruned weights, for the iterative procedure. A model that takes token ids (an
    embedding first) has no all-ones input: pass ``token_inputs`` (integer ids, e.g. a batch's) to run on them.
    """
    with _model_untouched(model, training=False):
        tensors: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            tensors[name] = p.detach().abs().double()
        for name, b in model.named_buffers():
            tensors[name] = b.detach().double() if b.is_floating_point() else b
        leaves = {}
        for name in params:
            leaf = tensors[name] * masks[name] if masks is not None else tensors[name]
            leaves[name] = leaf.detach().requires_grad_(True)
        tensors.update(leaves)
        device = next(iter(params.values())).device
        if token_inputs is not None:
            inputs = token_inputs.to(device)
        else:
            inputs = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
        flow = functional_call(model, tensors, (inputs,)).sum()
        grads = torch.autograd.grad(flow, list(leaves.values()))
    return {name: (leaves[name] * g).detach().abs().float() for name, g in zip(leaves, grads, strict=True)}


def compute_scores(
    kind: str,
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    *,
    batch: Batch | None = None,
    loss_fn: LossFn = F.cross_entropy,
    generator: torch.Generator | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of ``kind`` (a name in :data:`SCORES`) for ``params``."""
    score = SCORES.get(kind)
    return score(model, params, batch=batch, loss_fn=loss_fn, generator=generator, input_shape=input_shape)


@SCORES.register("magnitude")
def _magnitude(model: nn.Module, params: Mapping[str, torch.Tensor], **context: object) -> dict[str, torch.Tensor]:
    return magnitude_scores(params)


@SCORES.register("random")
def _random(
    model: nn.Module, params: Mapping[str, torch.Tensor], *, generator: torch.Generator | None, **context: object
) -> dict[str, torch.Tensor]:
    return random_scores(params, generator if generator is not None else torch.Generator().manual_seed(0))


@SCORES.register("gradient")
def _gradient(
    model: nn.Module, params: Mapping[str, torch.Tensor], *, batch: Batch | None, loss_fn: LossFn, **context: object
) -> dict[str, torch.Tensor]:
    return gradient_scores(model, params, _check_batch(batch, "gradient"), loss_fn)


@SCORES.register("snip")
def _snip(
    model: nn.Module, params: Mapping[str, torch.Tensor], *, batch: Batch | None, loss_fn: LossFn, **context: object
) -> dict[str, torch.Tensor]:
    return snip_scores(model, params, _check_batch(batch, "snip"), loss_fn)


@SCORES.register("grasp")
def _grasp(
    model: nn.Module, params: Mapping[str, torch.Tensor], *, batch: Batch | None, loss_fn: LossFn, **context: object
) -> dict[str, torch.Tensor]:
    return grasp_scores(model, params, _check_batch(batch, "grasp"), loss_fn)


@SCORES.register("synflow")
def _synflow(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None,
    **context: object,
) -> dict[str, torch.Tensor]:
    if input_shape is None:
        raise ValueError("the 'synflow' score needs input_shape (per-sample shape) or a batch to infer it from")
    return synflow_scores(model, params, input_shape)
