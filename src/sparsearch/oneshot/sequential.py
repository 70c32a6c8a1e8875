"""Layer-sequential calibration: prune a transformer block by block, each block fed by already-pruned ones.

The inputs of the first block are captured once (a pre-hook stops the forward pass there). Then, for every
block: hooks collect the input statistics of its Linear (and GPT-2 Conv1D) layers over the calibration
windows, each layer is pruned, and the block is run again with its pruned weights to produce the inputs of
the next block. Only one block's statistics exist at a time, so memory stays bounded by one block.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from sparsearch.oneshot.config import OneShotConfig
from sparsearch.oneshot.methods import (
    InputStatistics,
    check_group_size,
    prune_weight,
    relative_reconstruction_error,
    wanda_score,
)
from sparsearch.oneshot.owl import outlier_ratio, owl_sparsities
from sparsearch.oneshot.report import LayerReport, PruneReport

PRUNABLE_LAYERS = (nn.Linear, Conv1D)
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the largest ModuleList of identical modules holding Linear layers.

    Covers BERT-like (``encoder.layer``), GPT-2 (``transformer.h``) and Llama-like (``model.layers``) models.
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if any(isinstance(inner, PRUNABLE_LAYERS) for inner in module[0].modules()):
            candidates.append((sum(p.numel() for p in module.parameters()), name, module))
    if not candidates:
        raise ValueError(
            f"found no stack of transformer blocks in {type(model).__name__}: one-shot pruning needs a "
            "ModuleList of identical blocks that contain Linear or Conv1D layers"
        )
    _, name, blocks = max(candidates, key=lambda candidate: candidate[0])
    return name, blocks


def prunable_layers(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The Linear and Conv1D layers of a block, by name."""
    for name, module in block.named_modules():
        if isinstance(module, PRUNABLE_LAYERS):
            yield name, module


def weight_matrix(layer: nn.Module) -> Tensor:
    """The weight as [out_features, in_features] (Conv1D stores it transposed)."""
    return layer.weight.data.T if isinstance(layer, Conv1D) else layer.weight.data


def in_features(layer: nn.Module) -> int:
    return weight_matrix(layer).shape[1]


def _store_weight(layer: nn.Module, matrix: Tensor) -> None:
    stored = matrix.T if isinstance(layer, Conv1D) else matrix
    layer.weight.data.copy_(stored.to(layer.weight.dtype))


class _FirstBlockReachedError(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _capture_first_block_inputs(
    model: nn.Module, first_block: nn.Module, windows: Tensor, batch_size: int
) -> list[BlockCall]:
    calls: list[BlockCall] = []

    def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))
        raise _FirstBlockReachedError

    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    # token ids go where the embedding is (a model on a GPU takes calibration text tokenised on the CPU)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = embeddings.weight.device if embeddings is not None else next(model.parameters()).device
    try:
        for batch in windows.to(device).split(batch_size):
            try:
                model(input_ids=batch, attention_mask=torch.ones_like(batch))
            except _FirstBlockReachedError:
                continue
    finally:
        handle.remove()
    return calls


def _with_hidden_states(call: BlockCall, hidden: Tensor) -> BlockCall:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block: nn.Module, call: BlockCall) -> Tensor:
    args, kwargs = call
    output = block(*args, **kwargs)
    return output[0] if isinstance(output, tuple | list) else output


def _collect_input_statistics(
    block: nn.Module, named_layers: dict[str, nn.Module], calls: list[BlockCall]
) -> dict[str, InputStatistics]:
    """Input statistics of every layer of ``block`` over all calibration calls.

    Layers fed the very same tensor (query, key and value) share one statistics object, so the Gram matrix
    is accumulated once for them.
    """
    statistics: dict[str, InputStatistics] = {}
    # Inputs seen during the current call, kept alive so that no later tensor can reuse their address.
    seen_in_call: dict[tuple[int, tuple[int, ...]], tuple[str, Tensor]] = {}

    def record(name: str, inputs: Tensor) -> None:
        key = (inputs.data_ptr(), tuple(inputs.shape))
        owner, _ = seen_in_call.setdefault(key, (name, inputs))
        if name not in statistics:
            statistics[name] = (
                statistics[owner] if owner != name else InputStatistics(inputs.shape[-1], device=inputs.device)
            )
        if owner == name:
            statistics[name].update(inputs)

    handles = [
        layer.register_forward_hook(lambda _m, inputs, _o, name=name: record(name, inputs[0]))
        for name, layer in named_layers.items()
    ]
    try:
        for call in calls:
            seen_in_call.clear()
            _run_block(block, call)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def block_outlier_ratios(blocks: nn.ModuleList, calls: list[BlockCall], m: float) -> list[float]:
    """OWL's outlier ratio of every block of the dense model, each block fed the dense outputs of the last."""
    ratios = []
    for block in blocks:
        named_layers = dict(prunable_layers(block))
        statistics = _collect_input_statistics(block, named_layers, calls)
        scores = [wanda_score(weight_matrix(layer).float(), statistics[name]) for name, layer in named_layers.items()]
        ratios.append(outlier_ratio(scores, m))
        calls = [_with_hidden_states(call, _run_block(block, call)) for call in calls]
    return ratios


def check_pattern_fits(model: nn.Module, config: OneShotConfig) -> None:
    """Raise before anything changes if an N:M pattern does not tile some layer's input dimension."""
    blocks_name, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        for name, layer in prunable_layers(block):
            check_group_size(in_features(layer), config.n_m, f"{blocks_name}.{index}.{name}")


@torch.no_grad()
def prune_model(
    model: nn.Module,
    windows: Tensor,
    config: OneShotConfig,
    batch_size: int = 8,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> PruneReport:
    """Prune ``model`` in place, block by block, calibrated on token ``windows`` ``[n, seq_len]``.

    Only the Linear/Conv1D layers inside the transformer blocks are pruned (embeddings, heads and poolers
    keep their weights). With ``config.owl`` a first pass over the dense model sets every block's sparsity
    from its outlier ratio (same overall sparsity). ``on_layer`` is called with each layer's report as soon as
    it is pruned.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"calibration windows must be a non-empty [n, seq_len] tensor, got {tuple(windows.shape)}")
    start = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    check_pattern_fits(model, config)
    was_training = model.training
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    if use_cache is not None:
        # A key/value cache captured with the block inputs would grow every time a block is re-run.
        model_config.use_cache = False
    model.eval()
    layers: list[LayerReport] = []
    try:
        calls = _capture_first_block_inputs(model, blocks[0], windows, batch_size)
        block_configs = [config] * len(blocks)
        ratios: list[float] | None = None
        if config.owl:
            ratios = block_outlier_ratios(blocks, calls, config.owl_m)
            sizes = [sum(weight_matrix(layer).numel() for _, layer in prunable_layers(block)) for block in blocks]
            sparsities = owl_sparsities(ratios, config.target_sparsity, config.owl_lambda, sizes)
            block_configs = [dataclasses.replace(config, sparsity=value, owl=False) for value in sparsities]
        for index, block in enumerate(blocks):
            block_config = block_configs[index]
            named_layers = dict(prunable_layers(block))
            statistics = _collect_input_statistics(block, named_layers, calls)
            for name, layer in named_layers.items():
                layer_start = time.perf_counter()
                dense = weight_matrix(layer).float().contiguous().clone()
                layer_statistics = statistics[name]
                pruned, _keep, swaps = prune_weight(dense, layer_statistics, block_config)
                _store_weight(layer, pruned)
                stored = weight_matrix(layer)
                zeros = int((stored == 0).sum())
                report = LayerReport(
                    name=f"{blocks_name}.{index}.{name}",
                    shape=(stored.shape[0], stored.shape[1]),
                    target_sparsity=block_config.target_sparsity,
                    actual_sparsity=zeros / stored.numel(),
                    zeros=zeros,
                    reconstruction_error=relative_reconstruction_error(dense, stored, layer_statistics),
                    dsnot_swaps=swaps,
                    seconds=time.perf_counter() - layer_start,
                )
                layers.append(report)
                if on_layer is not None:
                    on_layer(report)
            calls = [_with_hidden_states(call, _run_block(block, call)) for call in calls]
    finally:
        if use_cache is not None:
            model_config.use_cache = use_cache
        model.train(was_training)
    return PruneReport.from_layers(
        layers,
        seconds=time.perf_counter() - start,
        method=config.method,
        dsnot=config.dsnot,
        pattern=config.pattern,
        budget=config.effective_budget,
        target_sparsity=config.target_sparsity,
        calibration_windows=windows.shape[0],
        calibration_tokens=windows.numel(),
        owl_outlier_ratios=ratios,
    )
