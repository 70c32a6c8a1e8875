"""Activations fused into the sparse layer before them: `SparseLinear(activation=...)` computes act(x W^T + b) in its
kernel call, and the model's activation module becomes a `FusedActivation` that lets that layer's outputs through.

A separate activation is another PyTorch op per layer: another pass over the output, an allocation, a dispatch.
all-MiniLM-L6-v2 at 90%, one sentence per call, medians of five fresh processes: the converted model ran 2.04x and
2.05x the dense one (two sets) with its six GELUs fused and 1.93x with them unfused, timed in the same rounds
(benchmarks/runtime_targets.py, results/runtime_targets.md, 2026-11-30).

Which pairs are fused is seen, not assumed from a model's class: on the sample input, every call of the activation
module must get, as that very tensor and from no other module in between, the output of the same sparse layer's call
just made, and that layer's every call must go to it. A layer whose output is also used elsewhere (a residual taken
before the activation, say) is caught only by the output check that `convert` makes afterwards, which undoes the
fusion if the outputs differ. The `FusedActivation` passes only tensors marked by its own layer's call and applies the
original activation to anything else, so an input the sample did not show it (another layer's output, a traced
graph's) still gets the activation.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsearch.engine.replaceable import replace_module
from sparsearch.kernels.modules import FusedActivation, SparseLinear

# activation modules of transformers (an optional dependency, matched by class name) -> the kernels' activation
_TRANSFORMERS_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
                             "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh",
                             "FastGELUActivation": "gelu_tanh"}


def activation_kind(module: nn.Module) -> str | None:
    """The kernels' name of what `module` computes ("relu", "gelu", "gelu_tanh"), or None for other modules."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    kind = _TRANSFORMERS_ACTIVATIONS.get(type(module).__name__)
    if kind == "gelu" and getattr(module, "act", None) not in (None, nn.functional.gelu):
        return None  # a GELUActivation of another transformers version computing something else
    return kind


def find_fusable(model: nn.Module, run: Callable[[], Any]) -> list[tuple[str, str, str]]:
    """(sparse layer, activation module, kind) for each activation module that, while `run()` runs the model, is
    called on nothing but outputs of one float32 or int8 `SparseLinear`, one call for each of that layer's calls, and
    gets them straight from the layer: a module that passes the output on as it is (a Dropout in eval mode, an
    Identity) may not in another mode, so such a layer is not fused."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, SparseLinear) and m.activation is None}
    activations = {name: m for name, m in model.named_modules() if activation_kind(m) is not None}
    if not layers or not activations:
        return []
    last_output: dict[str, torch.Tensor] = {}
    relayed: dict[str, bool] = {}  # the layer's last output was returned by another module since
    layer_calls: dict[str, int] = defaultdict(int)
    fed_by: dict[str, list[str | None]] = defaultdict(list)

    def after_layer(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            layer_calls[name] += 1
            last_output[name], relayed[name] = output, False
        return hook

    def after_other(module: nn.Module, args: tuple, output: Any) -> None:
        for layer, out in last_output.items():
            if out is output:
                relayed[layer] = True

    def before_activation(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            producers = [layer for layer, output in last_output.items() if output is x and not relayed[layer]]
            fed_by[name].append(producers[0] if len(producers) == 1 else None)
        return hook

    handles = [m.register_forward_hook(after_layer(n)) for n, m in layers.items()]
    handles += [m.register_forward_pre_hook(before_activation(n)) for n, m in activations.items()]
    # an activation may return its input itself (ReLU(inplace=True)): that is what it computes, not a pass-through;
    # a parent returning it (nn.Sequential(Linear, ReLU(inplace=True))) does so after the activation has taken it
    handles += [m.register_forward_hook(after_other) for m in model.modules()
                if not isinstance(m, SparseLinear) and activation_kind(m) is None]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    pairs, taken = [], set()
    for name, producers in fed_by.items():
        layer = producers[0]
        if layer is None or layer in taken or any(p != layer for p in producers) \
                or layer_calls[layer] != len(producers):
            continue
        taken.add(layer)
        pairs.append((layer, name, activation_kind(activations[name])))
    return pairs


def new_fusion_key() -> int:
    """A key for one fused pair: random, so that a layer's mark never opens another pair's activation."""
    return random.getrandbits(62)


def fuse(model: nn.Module, pairs: list[tuple[str, str, str]]) -> None:
    """Fuse each (sparse layer, activation module, kind) of `pairs` in `model` (in place)."""
    for layer_name, activation_name, kind in pairs:
        key = new_fusion_key()
        model.get_submodule(layer_name).set_activation(kind, key)
        replace_module(model, activation_name, FusedActivation(model.get_submodule(activation_name), key))


def unfuse(model: nn.Module) -> None:
    """Undo every fusion in `model` (in place): activation modules back, fused layers without their activation."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedActivation):
            replace_module(model, name, module.activation)
        elif isinstance(module, SparseLinear) and module.fusion_key is not None:
            module.set_activation(None)


def fused_pairs(model: nn.Module) -> dict[str, str]:
    """{sparse layer name: name of the activation module fused into it} of a model."""
    keys = {m.fusion_key: name for name, m in model.named_modules() if isinstance(m, FusedActivation)}
    return {name: keys[m.fusion_key] for name, m in model.named_modules()
            if isinstance(m, SparseLinear) and m.fusion_key in keys}
