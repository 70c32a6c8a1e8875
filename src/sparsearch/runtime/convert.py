"""`convert`: turn a masked or pruned model into an inference model that uses `SparseLinear` where it pays.

Each `nn.Linear` is timed dense (`F.linear`) and sparse (the runtime's kernels) on this machine at the batch
sizes the caller names; it becomes sparse only if the sparse kernel is at least `min_speedup` times faster at
every one of them, so a converted model is never slower than the dense one by more than timing noise. Layers
of other types with a matrix-like weight stay dense and are reported (and warned about).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sparsearch.runtime.format import PanelCSRMatrix
from sparsearch.runtime.kernels import sparse_linear
from sparsearch.runtime.modules import SparseLinear
from sparsearch.runtime.storage import compact_state, write_sparse_file

CHECKPOINT_MODEL_PREFIX = "model/"  # sparsearch.save checkpoints keep the model's state dict under this prefix


@dataclass(frozen=True)
class LayerDecision:
    """What `convert` did with one layer and why; times are the fastest of the repeats, ms per batch size."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    density: float
    sparse: bool
    reason: str
    dense_ms: dict[int, float] = field(default_factory=dict)
    sparse_ms: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ConversionReport:
    """Per-layer decisions of one `convert` call."""

    layers: list[LayerDecision]

    @property
    def sparse_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.sparse]

    @property
    def dense_layers(self) -> list[str]:
        return [d.name for d in self.layers if not d.sparse]

    def to_markdown(self) -> str:
        lines = ["| layer | type | shape | density | kept as | reason |", "|---|---|---|---|---|---|"]
        for d in self.layers:
            shape = "x".join(map(str, d.shape))
            lines.append(f"| {d.name} | {d.layer_type} | {shape} | {d.density:.3f} | "
                         f"{'sparse' if d.sparse else 'dense'} | {d.reason} |")
        return "\n".join(lines)


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs: other jobs on the same cores only ever add time, so the minimum is the
    steadiest estimate of what the layer itself costs (a median flips decisions on a busy machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def _decide_linear(name: str, linear: nn.Linear, batch_sizes: Sequence[int], min_speedup: float,
                   max_density: float, repeats: int) -> tuple[LayerDecision, SparseLinear | None]:
    weight = linear.weight.detach().float()
    density = float((weight != 0).float().mean()) if weight.numel() else 1.0
    shape = tuple(weight.shape)
    if density > max_density:
        reason = f"density {density:.3f} > max_density {max_density}: dense kernels win there"
        return LayerDecision(name, "Linear", shape, density, False, reason), None
    matrix = PanelCSRMatrix.from_dense(weight)
    bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
    dense_ms, sparse_ms = {}, {}
    with torch.no_grad():
        for batch in batch_sizes:
            x = torch.randn(batch, linear.in_features)
            dense_ms[batch] = _best_ms(lambda x=x: F.linear(x, weight, bias), repeats)
            sparse_ms[batch] = _best_ms(lambda x=x: sparse_linear(x, matrix, bias), repeats)
    speedups = {b: dense_ms[b] / max(sparse_ms[b], 1e-9) for b in batch_sizes}
    worst_batch = min(speedups, key=speedups.__getitem__)
    measured = ", ".join(f"batch {b}: {s:.2f}x" for b, s in speedups.items())
    if speedups[worst_batch] < min_speedup:
        reason = f"sparse/dense speed-up {measured} < min_speedup {min_speedup} at batch {worst_batch}"
        return LayerDecision(name, "Linear", shape, density, False, reason, dense_ms, sparse_ms), None
    decision = LayerDecision(name, "Linear", shape, density, True, f"sparse faster ({measured})",
                             dense_ms, sparse_ms)
    return decision, SparseLinear(matrix, bias)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert_with_report(model: nn.Module, *, batch_sizes: Sequence[int] = (1, 64, 256), min_speedup: float = 1.05,
                        max_density: float = 0.7, repeats: int = 5,
                        inplace: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Like `convert`, and also return the per-layer `ConversionReport`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive ints, got {batch_sizes!r}")
    if min_speedup <= 0:
        raise ValueError(f"min_speedup must be > 0, got {min_speedup}")
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    converted = model if inplace else copy.deepcopy(model)
    decisions: list[LayerDecision] = []
    replacements: list[tuple[str, SparseLinear]] = []
    for name, module in converted.named_modules():
        if isinstance(module, nn.Linear):
            decision, sparse = _decide_linear(name, module, batch_sizes, min_speedup, max_density, repeats)
            decisions.append(decision)
            if sparse is not None:
                replacements.append((name, sparse))
        elif isinstance(module, SparseLinear):
            decisions.append(LayerDecision(name, "SparseLinear", (module.out_features, module.in_features),
                                           module.matrix.density, True, "already sparse"))
        else:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                density = float((weight != 0).float().mean())
                decisions.append(LayerDecision(name, type(module).__name__, tuple(weight.shape), density, False,
                                               f"no sparse kernel for {type(module).__name__}: stays dense"))
    for name, sparse in replacements:
        _replace_module(converted, name, sparse)
    converted.eval()
    converted.requires_grad_(False)
    report = ConversionReport(decisions)
    unsupported = [d for d in decisions if d.layer_type not in ("Linear", "SparseLinear")]
    if unsupported:
        listed = ", ".join(f"{d.name} ({d.layer_type}, density {d.density:.2f})" for d in unsupported)
        warnings.warn(f"sparsearch.runtime.convert: layers without a sparse kernel stay dense: {listed}",
                      UserWarning, stacklevel=2)
    return converted, report


def convert(model: nn.Module, *, batch_sizes: Sequence[int] = (1, 64, 256), min_speedup: float = 1.05,
            max_density: float = 0.7, repeats: int = 5, inplace: bool = False) -> nn.Module:
    """Return an inference copy of `model` whose Linear layers use sparse kernels where measured faster.

    A layer goes sparse only if its non-zeros are at most `max_density` of the weight and the sparse kernel
    beats `F.linear` by `min_speedup` at every size in `batch_sizes`. Masked models need nothing special:
    the exact zeros in the weights are the mask. The result is in eval mode with gradients off.
    """
    converted, _ = convert_with_report(model, batch_sizes=batch_sizes, min_speedup=min_speedup,
                                       max_density=max_density, repeats=repeats, inplace=inplace)
    return converted


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {error}") from error
    if any(key.startswith(CHECKPOINT_MODEL_PREFIX) for key in state):
        state = {k[len(CHECKPOINT_MODEL_PREFIX):]: v for k, v in state.items()
                 if k.startswith(CHECKPOINT_MODEL_PREFIX)}
    return state


def convert_file(source: str | Path, target: str | Path, *, batch_sizes: Sequence[int] = (1, 64, 256),
                 min_speedup: float = 1.05, max_density: float = 0.7,
                 repeats: int = 5) -> tuple[ConversionReport, int]:
    """Convert a safetensors state dict (or a `sparsearch.save` checkpoint) to a sparse file, no model needed.

    Every 2-D floating `<name>.weight` is treated as a Linear layer (with `<name>.bias` if present) and
    decided like `convert` does; everything else is copied dense. Load the result with
    `load_sparse(target, model)`. Returns the report and the size of the written file in bytes.
    """
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise ValueError(f"target must differ from the source file, got {str(target)!r} for both")
    state = _read_state_dict(source)
    decisions = []
    sparse_modules: dict[str, SparseLinear] = {}
    for key, tensor in state.items():
        name, _, leaf = key.rpartition(".")
        if leaf != "weight" or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        bias = state.get(f"{name}.bias")
        linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(tensor)
            if bias is not None:
                linear.bias.copy_(bias)
        decision, sparse = _decide_linear(name, linear, batch_sizes, min_speedup, max_density, repeats)
        decisions.append(decision)
        if sparse is not None:
            sparse_modules[name] = sparse
    kept = {k: v for k, v in state.items() if k.rpartition(".")[0] not in sparse_modules or
            k.rpartition(".")[2] == "bias"}
    tensors, entries = compact_state(kept, sparse_modules)
    return ConversionReport(decisions), write_sparse_file(tensors, entries, target)
