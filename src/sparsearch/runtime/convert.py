"""`convert`: turn a masked or pruned model into an inference model that uses sparse layers where they pay.

Which layers can go sparse: every `nn.Linear` (and transformers' GPT-2 `Conv1D`, whose weight is stored
transposed) that the model calls as a module -> `SparseLinear`; every `nn.Conv1d` / `nn.Conv2d` (any stride,
padding, dilation, groups, padding mode) that the model calls on a batched sample input -> `SparseConv1d` /
`SparseConv2d` (timed on inputs of the size it saw, so without a sample input, or with int8, convolutions
stay dense). A layer whose parent reads its weight itself (the `out_proj` of `nn.MultiheadAttention`, or any
layer that is not called on the sample input) or whose weight is tied to another module's (an LM head tied
to its embedding) stays dense, and the report says why.

Which of those go sparse: each is timed dense (`F.linear`, or the convolution itself) against sparse (the
runtime's kernels) on this machine at the batch sizes the caller names, in interleaved pairs
(`timing.paired_speedup`), and goes sparse only if the median speed-up reaches `min_speedup` at every one of
them; the report gives the speed-up and how many of the rounds agreed. Given a sample input, `convert` then
checks that the converted model computes what the original does (layers that break it go back to dense), tries
the layers that came close alone (at least `NEAR_SPEEDUP` of dense) sparse together in the whole model and keeps
them sparse if the model is faster with them (a layer timed alone has its dense weights hot in the cache; in a
model they are not), on the sample input and on it tiled to each batch size asked for that is a whole multiple of
the rows it gives them, and times the whole model: if it is slower than the original (or than min(1, min_speedup)
times it: a tiny `min_speedup` forces sparse layers), every layer goes back to dense, so a converted model is never
slower than the original.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sparsearch.engine.replaceable import reason_to_keep_dense, replace_module, shared_parameters
from sparsearch.kernels.cpu import get_backend, sparse_linear
from sparsearch.kernels.format import ACTIVATION_BITS, PanelCSRMatrix, check_activation_bits
from sparsearch.kernels.modules import SparseLinear, linear_like
from sparsearch.runtime.conv import SparseConv1d, SparseConv2d, sparse_conv_for
from sparsearch.runtime.fusion import find_fusable, fuse, fused_pairs, unfuse
from sparsearch.runtime.storage import compact_state, write_sparse_file
from sparsearch.runtime.timing import PairedTiming, paired_speedup

FP32_TOLERANCE = 1e-4  # largest output difference allowed, relative to max(1, |output|): summation order only
INT8_TOLERANCE = 5e-2  # int8 weights round each weight by up to half a step of its group's scale
CHECKPOINT_MODEL_PREFIX = "model/"  # sparsearch.save checkpoints keep the model's state dict under this prefix
# Parameter names that hold lookup tables rather than Linear weights, for `convert_file`, which has no model to ask
EMBEDDING_NAME_PARTS = ("embed", "wte", "wpe", "tok_embeddings", "shared")
# Layers at least this fast sparse as dense alone get a second look in the whole model (`_second_look`)
NEAR_SPEEDUP = 0.75
SUPPORTED_TYPES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "SparseLinear", "SparseConv1d", "SparseConv2d")


@dataclass(frozen=True)
class LayerDecision:
    """What `convert` did with one layer and why; times are medians of interleaved runs, ms per batch size.

    `speedup` is the median per-round dense/sparse ratio per batch size and `confidence` the smallest
    fraction of rounds that agreed with the decision (1.0: every round did)."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    density: float
    sparse: bool
    reason: str
    dense_ms: dict[int, float] = field(default_factory=dict)
    sparse_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    confidence: float | None = None


@dataclass(frozen=True)
class ConversionReport:
    """Per-layer decisions of one `convert` call, the output check and the whole-model timing (if any)."""

    layers: list[LayerDecision]
    output_check: str = "not checked: no sample_input given"
    model_timing: PairedTiming | None = None
    # "activation module (kind) into sparse layer" for each activation fused (see sparsearch.runtime.fusion), and why
    # none was where fusion was tried and undone
    fused_activations: list[str] = field(default_factory=list)
    fusion_check: str = ""

    @property
    def sparse_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.sparse]

    @property
    def dense_layers(self) -> list[str]:
        return [d.name for d in self.layers if not d.sparse]

    def fusion_lines(self) -> list[str]:
        """What the report says about fused activations (for `to_markdown` and the CLI): none where none were."""
        lines = []
        if self.fused_activations:
            lines.append(f"Activations computed by the sparse layer before them: "
                         f"{'; '.join(self.fused_activations)}.")
        if self.fusion_check:
            lines.append(f"Activations: {self.fusion_check}.")
        return lines

    def to_markdown(self) -> str:
        lines = ["| layer | type | shape | density | kept as | speed-up (median) | confidence | reason |",
                 "|---|---|---|---|---|---|---|---|"]
        for d in self.layers:
            shape = "x".join(map(str, d.shape))
            speedups = ", ".join(f"b{b}: {s:.2f}x" for b, s in d.speedup.items()) or "-"
            confidence = "-" if d.confidence is None else f"{d.confidence:.2f}"
            lines.append(f"| {d.name} | {d.layer_type} | {shape} | {d.density:.3f} | "
                         f"{'sparse' if d.sparse else 'dense'} | {speedups} | {confidence} | {d.reason} |")
        lines.append("")
        lines += self.fusion_lines()
        lines.append(f"Outputs: {self.output_check}.")
        if self.model_timing is not None:
            t = self.model_timing
            lines.append(f"Whole model on the sample input: {t.speedup:.2f}x the original (median of {t.rounds} "
                         f"paired rounds, {t.confidence:.0%} agree; original {t.baseline_ms:.3f} ms, converted "
                         f"{t.candidate_ms:.3f} ms).")
        return "\n".join(lines)


def _time_layer(name: str, layer_type: str, shape: tuple[int, ...], density: float, batch_sizes: Sequence[int],
                dense: Callable[[torch.Tensor], object], sparse: Callable[[torch.Tensor], object],
                make_input: Callable[[int], torch.Tensor], min_speedup: float, repeats: int,
                label: str = "sparse") -> LayerDecision:
    """Time `dense` against `sparse` on `make_input(batch)` at every batch size and decide (module docstring)."""
    dense_ms, sparse_ms, speedups, confidence = {}, {}, {}, 1.0
    # sparse work is density x dense work: a measured speed-up far beyond 1/density means load hit the dense call
    plausible = 2.0 / max(density, 1e-6)
    with torch.no_grad():
        for batch in batch_sizes:
            x = make_input(batch)
            timing = paired_speedup(lambda x=x: dense(x), lambda x=x: sparse(x), threshold=min_speedup,
                                    rounds=repeats, plausible_max=plausible)
            dense_ms[batch], sparse_ms[batch], speedups[batch] = timing.baseline_ms, timing.candidate_ms, timing.speedup
            confidence = min(confidence, timing.confidence)
    worst_batch = min(speedups, key=speedups.__getitem__)
    measured = ", ".join(f"batch {b}: {s:.2f}x" for b, s in speedups.items())
    if speedups[worst_batch] < min_speedup:
        reason = f"sparse/dense speed-up {measured} < min_speedup {min_speedup} at batch {worst_batch}"
        return LayerDecision(name, layer_type, shape, density, False, reason, dense_ms, sparse_ms, speedups,
                             confidence)
    return LayerDecision(name, layer_type, shape, density, True, f"{label} faster ({measured})", dense_ms,
                         sparse_ms, speedups, confidence)


def _density(weight: torch.Tensor) -> float:
    return float((weight != 0).float().mean()) if weight.numel() else 1.0


def _too_dense(name: str, layer_type: str, shape: tuple[int, ...], density: float,
               max_density: float) -> LayerDecision | None:
    if density <= max_density:
        return None
    reason = f"density {density:.3f} > max_density {max_density}: dense kernels win there"
    return LayerDecision(name, layer_type, shape, density, False, reason)


def _decide_weight(name: str, layer_type: str, weight: torch.Tensor, bias: torch.Tensor | None,
                   batch_sizes: Sequence[int], min_speedup: float, max_density: float,
                   repeats: int, int8: bool = False, int8_activation_bits: int | str = "auto"
                   ) -> tuple[LayerDecision, SparseLinear | None]:
    """Time a [out, in] weight dense against sparse and decide (see the module docstring)."""
    weight = weight.detach().float().contiguous()
    density, shape = _density(weight), tuple(weight.shape)
    too_dense = _too_dense(name, layer_type, shape, density, max_density)
    if too_dense is not None:
        return too_dense, None
    matrix = PanelCSRMatrix.from_dense(weight)
    if int8:
        matrix = matrix.quantize(int8_activation_bits)
    bias = None if bias is None else bias.detach().float().contiguous()
    decision = _time_layer(name, layer_type, shape, density, batch_sizes, lambda x: F.linear(x, weight, bias),
                           lambda x: sparse_linear(x, matrix, bias), lambda batch: torch.randn(batch, shape[1]),
                           min_speedup, repeats, f"sparse{' int8' if int8 else ''}")
    return decision, SparseLinear(matrix, bias)


def _conv_reason_to_keep_dense(name: str, called: dict[str, tuple[int, ...] | None] | None,
                               int8: bool) -> str | None:
    """Why a convolution stays dense before any timing, or None (`called`: see `_called_modules`)."""
    if int8:
        return "int8 sparse convolutions are not implemented: stays dense (float32)"
    if called is None:
        return "no sample_input: a convolution's speed depends on its input size, so it is timed only with one"
    if name not in called:
        return "not called as a module on the sample input (or unused)"
    if called[name] is None:
        return "called on an unbatched input in the sample: timed only on batched inputs, stays dense"
    if get_backend().name != "c":
        return "sparse convolutions need the C kernels (the numba fallback is in use): stays dense"
    return None


def _decide_conv(name: str, conv: nn.Module, input_shape: tuple[int, ...], batch_sizes: Sequence[int],
                 min_speedup: float, max_density: float, repeats: int) -> tuple[LayerDecision, nn.Module | None]:
    """Time a convolution (on inputs shaped like the one it saw, per sample) dense against sparse and decide."""
    layer_type, shape = type(conv).__name__, tuple(conv.weight.shape)
    density = _density(conv.weight.detach())
    too_dense = _too_dense(name, layer_type, shape, density, max_density)
    if too_dense is not None:
        return too_dense, None
    sparse = sparse_conv_for(conv).from_conv(conv)
    decision = _time_layer(name, layer_type, shape, density, batch_sizes, conv, sparse,
                           lambda batch: torch.randn(batch, *input_shape), min_speedup, repeats)
    return decision, sparse


def _holder_of_bare_layer(model: nn.Module) -> nn.Module | None:
    """A container holding `model` as its child "0" when `model` is itself a layer the runtime replaces (a module
    cannot replace itself inside its parent: it has none); None otherwise."""
    return nn.Sequential(model) if linear_like(model) is not None or sparse_conv_for(model) is not None else None


def _unheld(decisions: list[LayerDecision]) -> list[LayerDecision]:
    """Decisions made inside `_holder_of_bare_layer`'s container, named as in the bare layer ("" for itself)."""
    return [dataclasses.replace(d, name=d.name.partition(".")[2]) for d in decisions]


def _run(model: nn.Module, sample_input: Any) -> Any:
    with torch.no_grad():
        if isinstance(sample_input, dict):
            return model(**sample_input)
        if isinstance(sample_input, tuple):
            return model(*sample_input)
        return model(sample_input)


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model output (tensor, tuple, list, dict or transformers ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, list | tuple):
        return [t for value in output for t in _tensors(value)]
    return []


def output_difference(reference: Any, candidate: Any) -> float:
    """Largest absolute difference over all output tensors, relative to max(1, largest reference magnitude)."""
    refs, cands = _tensors(reference), _tensors(candidate)
    if len(refs) != len(cands) or any(r.shape != c.shape for r, c in zip(refs, cands, strict=True)):
        return math.inf
    worst = 0.0
    for ref, cand in zip(refs, cands, strict=True):
        if ref.numel():
            scale = max(1.0, float(ref.detach().abs().max()))
            worst = max(worst, float((ref.detach().float() - cand.detach().float()).abs().max()) / scale)
    return worst


def _called_modules(model: nn.Module, names: list[str], sample_input: Any
                    ) -> tuple[dict[str, tuple[int, ...] | None], dict[str, int]]:
    """The modules among `names` that the model calls as modules on `sample_input` (others have their weight
    read by a parent, like nn.MultiheadAttention's out_proj, or are unused), with the shape of one sample of
    their first input (without the batch dimension; None for an unbatched call); and for the linear ones the rows
    their first call got (the "batch size" of `batch_sizes`: every leading index of the input)."""
    called: dict[str, tuple[int, ...] | None] = {}
    rows: dict[str, int] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        batched = first is not None and (sparse_conv_for(module) is None or first.dim() == module.weight.dim())
        called.setdefault(name, tuple(first.shape[1:]) if batched else None)
        if first is not None and first.dim() and first.shape[-1] and sparse_conv_for(module) is None:
            rows.setdefault(name, first.numel() // first.shape[-1])

    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: record(name, module, args)) for name in names]
    try:
        _run(model, sample_input)
    finally:
        for handle in handles:
            handle.remove()
    return called, rows


def _tiled(sample_input: Any, factor: int) -> Any:
    """`sample_input` with every tensor repeated `factor` times along its first dimension: the same input as a batch
    of `factor` copies, so that each layer gets `factor` times the rows."""
    def tile(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.repeat(factor, *([1] * (value.dim() - 1)))
        return value

    if isinstance(sample_input, dict):
        return {key: tile(value) for key, value in sample_input.items()}
    if isinstance(sample_input, tuple):
        return tuple(tile(value) for value in sample_input)
    return tile(sample_input)


def _unsupported(name: str, module: nn.Module) -> list[LayerDecision]:
    """Decisions for the matrix-like parameters of a module the runtime has no kernel for."""
    decisions = []
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() < 2:
            continue
        label = name if param_name == "weight" else f"{name}.{param_name}" if name else param_name
        density = float((param != 0).float().mean())
        kind = type(module).__name__
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            reason = "embedding table (a lookup, not a matrix product): stays dense"
        elif isinstance(module, nn.MultiheadAttention):
            reason = f"nn.MultiheadAttention computes with {param_name} itself: no sparse kernel, stays dense"
        else:
            reason = f"no sparse kernel for {kind}: stays dense"
        decisions.append(LayerDecision(label, kind, tuple(param.shape), density, False, reason))
    return decisions


def _try(reference: Any, model: nn.Module, sample_input: Any) -> tuple[float, str]:
    """(output difference, what went wrong or "") of `model` on `sample_input` against `reference`."""
    try:
        difference = output_difference(reference, _run(model, sample_input))
    except Exception as error:  # any failure of the converted model means a replacement broke it
        return math.inf, f"the forward pass raised {type(error).__name__}: {error}"
    return difference, "" if math.isfinite(difference) else "the outputs changed shape"


def _check_replacements(reference: Any, converted: nn.Module, sample_input: Any,
                        replacements: list[tuple[str, nn.Module, nn.Module]], tolerance: float
                        ) -> tuple[dict[str, str], float]:
    """Layers whose replacement breaks the model (each tried alone if the whole fails) -> why; the final
    difference. Broken layers are put back to the original in `converted`."""
    difference, _ = _try(reference, converted, sample_input)
    if difference <= tolerance:
        return {}, difference
    for name, original, _ in replacements:  # back to the original model, then one replacement at a time
        replace_module(converted, name, original)
    broken = {}
    for name, original, sparse in replacements:
        replace_module(converted, name, sparse)
        alone, failure = _try(reference, converted, sample_input)
        replace_module(converted, name, original)
        if alone > tolerance:
            broken[name] = (f"kept dense: replacing it broke the model on the sample input "
                            f"({failure or f'outputs differ by {alone:.2e} > tolerance {tolerance}'})")
    for name, _, sparse in replacements:
        if name not in broken:
            replace_module(converted, name, sparse)
    difference, failure = _try(reference, converted, sample_input)
    if difference > tolerance:  # no single culprit: the combination breaks it, so nothing is replaced
        for name, original, _ in replacements:
            replace_module(converted, name, original)
            broken.setdefault(name, f"kept dense: the replaced layers together broke the model on the sample "
                                    f"input ({failure or f'outputs differ by {difference:.2e}'})")
        difference, _ = _try(reference, converted, sample_input)
    return broken, difference


def _sort_timed(decision: LayerDecision, entry: tuple[str, nn.Module, nn.Module | None],
                replacements: list[tuple[str, nn.Module, nn.Module]],
                near_misses: list[tuple[str, nn.Module, nn.Module]], second_look: bool) -> None:
    """A timed layer's sparse module goes to the replacements, to the near misses (only those within NEAR_SPEEDUP:
    the others are dropped at once, so a large model does not hold a sparse copy of every layer), or nowhere."""
    if entry[2] is None:
        return
    if decision.sparse:
        replacements.append(entry)
    elif second_look and min(decision.speedup.values(), default=0.0) >= NEAR_SPEEDUP:
        near_misses.append(entry)


def _larger_inputs(sample_input: Any, near_misses: list[tuple[str, nn.Module, nn.Module]], rows_seen: dict[str, int],
                   batch_sizes: Sequence[int]) -> list[tuple[int, Any]]:
    """(batch size, the sample input tiled to it) for each of `batch_sizes` that is a whole multiple, above one, of
    the rows the near misses got on the sample input (when they all got the same), so that the whole model is timed
    there too: on one generated token per sequence, a decoder's sample gives 1 row, and batch size 8 is the same
    input tiled 8 times."""
    rows = {rows_seen.get(name) for name, _, _ in near_misses}
    if len(rows) != 1 or None in rows:
        return []
    (seen,) = rows
    return [(size, _tiled(sample_input, size // seen)) for size in sorted(set(batch_sizes))
            if size > seen and size % seen == 0]


def _second_look(reference: Any, converted: nn.Module, sample_input: Any,
                 near_misses: list[tuple[str, nn.Module, nn.Module]], timed_alone: dict[str, str],
                 difference: float, tolerance: float, repeats: int, min_speedup: float,
                 larger: Sequence[tuple[int, Any]] = ()) -> tuple[dict[str, tuple[bool, str]], float]:
    """Layers that were slower alone but close (>= NEAR_SPEEDUP): tried together in the whole model, kept sparse if
    the model with them is at least `min_speedup` times as fast as without them, the bar each layer failed alone
    (-> {name: (sparse, reason)}, and the output difference), on the sample input and on each of `larger` (the
    sample tiled to another of the batch sizes asked for: see `_larger_inputs`; a tiled input the model refuses is
    skipped). GPT-2-style decoder at 50%, converted for batch sizes 1 and 8 on a one-token sample: 14 layers within
    NEAR_SPEEDUP made the model faster at 1 sequence, but they were 0.90x-0.93x alone at 8 rows, and the converted
    model generated at 0.90x the dense one at batch 8 (benchmarks/results/runtime_transformers.md, before this check).

    A layer timed alone has its dense weights hot in the cache, call after call; inside a model the other layers
    evict them, so the dense layer is slower there than its own timing says and the sparse one (a tenth of the
    bytes at 90%) loses less. Measured: GPT-2-style 6x768 decoder at 90%, batch 1, the per-layer choice kept 13 of
    25 layers sparse (1.17x the dense model) where all 25 gave 1.32x (benchmarks/results/runtime_transformers.md).
    """
    for name, _, sparse in near_misses:
        replace_module(converted, name, sparse)
    with_them, failure = _try(reference, converted, sample_input)

    def use(modules: int, inputs: Any = sample_input) -> Callable[[], object]:
        def run() -> object:
            for entry in near_misses:
                replace_module(converted, entry[0], entry[modules])
            return _run(converted, inputs)
        return run

    if with_them <= tolerance:
        timing = paired_speedup(use(1), use(2), threshold=min_speedup, rounds=max(repeats, 5))
        why = f"the whole model ran {timing.speedup:.2f}x as fast with them (< min_speedup {min_speedup})"
        gains = timing.speedup >= min_speedup
        for size, inputs in larger if gains else ():
            try:
                use(2, inputs)()
            except Exception:  # a model that takes the sample's batch only: nothing more to time there
                continue
            tiled = paired_speedup(use(1, inputs), use(2, inputs), threshold=min_speedup, rounds=max(repeats, 5))
            if tiled.speedup < min_speedup:
                gains = False
                why = (f"the whole model ran {timing.speedup:.2f}x as fast with them on the sample input but "
                       f"{tiled.speedup:.2f}x on it tiled to batch size {size} (< min_speedup {min_speedup})")
                break
        if gains:
            for name, _, sparse in near_misses:
                replace_module(converted, name, sparse)
            return {name: (True, f"{timed_alone[name]}, but the whole model ran {timing.speedup:.2f}x faster "
                                 f"with the {len(near_misses)} layers within {NEAR_SPEEDUP}x of dense sparse than "
                                 f"dense ({timing.confidence:.0%} of {timing.rounds} rounds agree): sparse")
                    for name, _, _ in near_misses}, with_them
    else:
        why = failure or f"outputs differ by {with_them:.2e} > tolerance {tolerance}"
    for name, original, _ in near_misses:
        replace_module(converted, name, original)
    return {name: (False, f"{timed_alone[name]}; tried sparse in the whole model with the other layers within "
                          f"{NEAR_SPEEDUP}x of dense, and {why}: kept dense") for name, _, _ in near_misses}, difference


def _fuse_activations(reference: Any, converted: nn.Module, sample_input: Any, difference: float,
                      tolerance: float) -> tuple[float, str]:
    """Fuse the activation modules that take nothing but a sparse layer's outputs into that layer (see
    sparsearch.runtime.fusion), unless the outputs then differ from the original's: (output difference, and why
    nothing was fused where fusion was undone, else "")."""
    pairs = find_fusable(converted, lambda: _run(converted, sample_input))
    if not pairs:
        return difference, ""
    fuse(converted, pairs)
    fused_difference, failure = _try(reference, converted, sample_input)
    if fused_difference <= tolerance:
        return fused_difference, ""
    unfuse(converted)
    why = failure or f"by {fused_difference:.2e} > tolerance {tolerance}"
    return difference, (f"not fused into the sparse layers before them: with {len(pairs)} fused the outputs differed "
                        f"from the original's ({why}; a layer's output is used elsewhere too?)")


def convert_with_report(model: nn.Module, sample_input: Any = None, *, batch_sizes: Sequence[int] = (1, 64, 256),
                        min_speedup: float = 1.05, max_density: float = 0.7, repeats: int = 5,
                        tolerance: float | None = None, int8: bool = False, int8_activation_bits: int | str = "auto",
                        inplace: bool = False, fuse_activations: bool = True) -> tuple[nn.Module, ConversionReport]:
    """Like `convert`, and also return the per-layer `ConversionReport`."""
    if isinstance(int8_activation_bits, bool) or int8_activation_bits not in ACTIVATION_BITS \
            or (int8_activation_bits != "auto" and not int8):
        raise ValueError(f"int8_activation_bits must be one of {ACTIVATION_BITS}, and other than 'auto' only with "
                         f"int8=True; got {int8_activation_bits!r} with int8={int8}")
    tolerance = (INT8_TOLERANCE if int8 else FP32_TOLERANCE) if tolerance is None else tolerance
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
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    converted = model if inplace else copy.deepcopy(model)
    converted.eval()
    holder = _holder_of_bare_layer(converted)  # a bare Linear or Conv: its replacement is returned
    if holder is not None:
        model, converted = nn.Sequential(model), holder
    candidates = {name: module for name, module in converted.named_modules()
                  if linear_like(module) or sparse_conv_for(module)}
    reference = None
    called, rows_seen = None, {}
    if sample_input is not None:
        try:
            reference = _run(converted, sample_input)
            called, rows_seen = _called_modules(converted, list(candidates), sample_input)
        except Exception as error:
            raise ValueError(f"the model fails on sample_input before any conversion: {error}") from error
    owners = shared_parameters(converted)
    decisions: list[LayerDecision] = []
    replacements: list[tuple[str, nn.Module, nn.Module]] = []
    near_misses: list[tuple[str, nn.Module, nn.Module]] = []  # timed, slower alone: see _second_look
    for name, module in converted.named_modules():
        view = linear_like(module)
        if view is not None:
            layer_type, weight, bias = view
            reason = reason_to_keep_dense(converted, name, owners)
            if reason is None and called is not None and name not in called:
                reason = ("not called as a module on the sample input: its parent reads its weight itself "
                          "(or it is unused)")
            if reason is not None:
                density = float((weight != 0).float().mean())
                decisions.append(LayerDecision(name, layer_type, tuple(weight.shape), density, False, reason))
                continue
            decision, sparse = _decide_weight(name, layer_type, weight, bias, batch_sizes, min_speedup,
                                              max_density, repeats, int8, int8_activation_bits)
            decisions.append(decision)
            _sort_timed(decision, (name, module, sparse), replacements, near_misses, sample_input is not None)
        elif sparse_conv_for(module) is not None:
            reason = reason_to_keep_dense(converted, name, owners) or _conv_reason_to_keep_dense(name, called, int8)
            if reason is not None:
                decisions.append(LayerDecision(name, type(module).__name__, tuple(module.weight.shape),
                                               _density(module.weight.detach()), False, reason))
                continue
            decision, sparse = _decide_conv(name, module, called[name], batch_sizes, min_speedup, max_density,
                                            repeats)
            decisions.append(decision)
            _sort_timed(decision, (name, module, sparse), replacements, near_misses, sample_input is not None)
        elif isinstance(module, SparseLinear | SparseConv1d | SparseConv2d):
            decisions.append(LayerDecision(name, type(module).__name__, tuple(module.weight_shape),
                                           module.matrix.density, True, "already sparse"))
        else:
            decisions.extend(_unsupported(name, module))
    for name, _, sparse in replacements:
        replace_module(converted, name, sparse)
    output_check, model_timing, fusion_check = "not checked: no sample_input given", None, ""
    if sample_input is not None:
        reasons, difference = _check_replacements(reference, converted, sample_input, replacements, tolerance)
        promoted: set[str] = set()  # near misses that the whole model made sparse
        broken = set(reasons)
        replacements = [r for r in replacements if r[0] not in broken]
        if near_misses:
            second, difference = _second_look(reference, converted, sample_input, near_misses,
                                              {d.name: d.reason for d in decisions},
                                              difference, tolerance, repeats, min_speedup,
                                              _larger_inputs(sample_input, near_misses, rows_seen, batch_sizes))
            promoted = {name for name, (sparse, _) in second.items() if sparse}
            replacements += [r for r in near_misses if r[0] in promoted]
            reasons.update({name: why for name, (_, why) in second.items()})
        if fuse_activations and replacements:
            difference, fusion_check = _fuse_activations(reference, converted, sample_input, difference, tolerance)
        output_check = (f"converted model matches the original on the sample input (largest difference "
                        f"{difference:.2e} relative to max(1, |output|), tolerance {tolerance})")
        if replacements:
            if inplace:  # the original is gone: rebuild it from the replaced modules
                original = copy.deepcopy(converted)
                unfuse(original)
                for name, module, _ in replacements:
                    replace_module(original, name, module)
            else:
                original = model
            modes = {name: m.training for name, m in original.named_modules()}
            original.eval()
            try:
                model_timing = paired_speedup(lambda: _run(original, sample_input),
                                              lambda: _run(converted, sample_input),
                                              threshold=min(1.0, min_speedup), rounds=max(repeats, 5))
            finally:
                for name, m in original.named_modules():
                    m.training = modes.get(name, m.training)
            if model_timing.speedup < min(1.0, min_speedup):
                unfuse(converted)
                for name, module, _ in replacements:
                    replace_module(converted, name, module)
                    promoted.discard(name)
                    reasons[name] = (f"reverted: the whole converted model measured {model_timing.speedup:.2f}x "
                                     "the original on the sample input, so every layer stays dense")
        decisions = [dataclasses.replace(d, sparse=d.name in promoted, reason=reasons[d.name])
                     if d.name in reasons else d for d in decisions]
    converted.requires_grad_(False)
    if holder is not None:
        converted, decisions = converted[0], _unheld(decisions)
    fused = fused_pairs(converted)
    kinds = {name: m.activation for name, m in converted.named_modules() if name in fused}
    report = ConversionReport(decisions, output_check, model_timing,
                              [f"{act} ({kinds[layer]}) into {layer}" for layer, act in fused.items()], fusion_check)
    unsupported = [d for d in decisions if d.layer_type not in SUPPORTED_TYPES
                   and not d.reason.startswith("embedding table")]
    unsampled = [d for d in decisions if d.reason.startswith("no sample_input")]
    if unsampled:
        listed = ", ".join(f"{d.name} ({d.layer_type})" for d in unsampled)
        warnings.warn(f"sparsearch.runtime.convert: convolutions stay dense without a sample_input (their speed "
                      f"depends on the input size): {listed}", UserWarning, stacklevel=2)
    if unsupported:
        listed = ", ".join(f"{d.name} ({d.layer_type}, density {d.density:.2f})" for d in unsupported)
        warnings.warn(f"sparsearch.runtime.convert: layers without a sparse kernel stay dense: {listed}",
                      UserWarning, stacklevel=2)
    if sample_input is None and any(d.sparse for d in decisions):
        warnings.warn("sparsearch.runtime.convert: no sample_input given, so the converted model's outputs were "
                      "not checked against the original; pass one (e.g. convert(model, example_batch))",
                      UserWarning, stacklevel=2)
    return converted, report


def convert(model: nn.Module, sample_input: Any = None, *, batch_sizes: Sequence[int] = (1, 64, 256),
            min_speedup: float = 1.05, max_density: float = 0.7, repeats: int = 5, tolerance: float | None = None,
            int8: bool = False, int8_activation_bits: int | str = "auto", inplace: bool = False,
            fuse_activations: bool = True) -> nn.Module:
    """Return an inference copy of `model` whose Linear and Conv1d/Conv2d layers use sparse kernels where faster.

    A layer goes sparse only if its non-zeros are at most `max_density` of the weight and the sparse kernel
    beats the dense layer by `min_speedup` (median of interleaved paired rounds) at every size in `batch_sizes`.
    `sample_input` (a tensor, a tuple of positional arguments or a dict of keyword arguments) is what the
    model is called with to check outputs (to `tolerance`, relative to max(1, |output|)) and whole-model speed;
    without it, those checks are skipped (with a warning) and convolutions stay dense (they are timed on inputs
    of the size they see in it). `int8=True` stores the sparse layers' values as int8 with one float32 scale per
    segment, a row within a panel (timed as such; default tolerance 5e-2 instead of 1e-4);
    `int8_activation_bits` is how their batch-1 kernel quantises each input: "auto" (8 bits unless that moves the
    input by more than 2% of its norm, then 16), 8 (W8A8: fastest, least exact) or 16; see
    `PanelCSRMatrix.quantize`. Masked models need nothing special: the exact zeros in the weights
    are the mask. Given a sample input, an activation module (ReLU, GELU, transformers' GELU variants) that takes
    nothing but one sparse layer's outputs is computed by that layer in its kernel call (`fuse_activations=False`
    keeps them apart; see `sparsearch.runtime.fusion`). The result is in eval mode with gradients off. A bare layer
    (an `nn.Linear` or convolution as the model itself) is returned as its replacement, even with `inplace=True` (a
    module cannot replace itself).
    """
    converted, _ = convert_with_report(model, sample_input, batch_sizes=batch_sizes, min_speedup=min_speedup,
                                       max_density=max_density, repeats=repeats, tolerance=tolerance, int8=int8,
                                       int8_activation_bits=int8_activation_bits, inplace=inplace,
                                       fuse_activations=fuse_activations)
    return converted


def to_int8(model: nn.Module, activation_bits: int | str = "auto") -> nn.Module:
    """A copy of a converted model whose `SparseLinear` layers hold int8 values with a scale per segment (the same
    layers, without re-timing them: for comparing int8 with float32 on the same decisions); `activation_bits`: see
    `PanelCSRMatrix.quantize`."""
    check_activation_bits(activation_bits)
    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        if isinstance(module, SparseLinear):
            replace_module(quantized, name, SparseLinear(module.matrix.quantize(activation_bits), module.bias,
                                                         activation=module.activation, fusion_key=module.fusion_key))
    return quantized


def for_training(model: nn.Module, *, max_density: float = 0.3) -> tuple[nn.Module, ConversionReport]:
    """A copy of `model` to train with its sparsity pattern fixed and its sparse layers on the kernels: every
    `nn.Linear` (or GPT-2 `Conv1D`) with at most `max_density` non-zeros becomes a trainable `SparseLinear`, whose
    parameters are the stored non-zeros and the bias, forward and backward on the sparse kernels; any torch
    optimizer and training loop train it (a static mask, without the dense products of masked dense training).
    Not timed: training costs three products per layer, not one, and at 90% the kernels' step is faster than the
    dense one at batch 64 and 256 (benchmarks/results/training_kernels.md); `max_density` is where to stop. Layers
    whose weight is tied or read by their parent stay dense, with the reason in the report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density}")
    trainable = copy.deepcopy(model)
    holder = _holder_of_bare_layer(trainable)
    trainable = trainable if holder is None else holder
    owners = shared_parameters(trainable)
    decisions, replacements = [], []
    for name, module in trainable.named_modules():
        view = linear_like(module)
        if view is None:
            continue
        layer_type, weight, bias = view
        density = _density(weight.detach())
        reason = reason_to_keep_dense(trainable, name, owners) or (
            f"density {density:.3f} > max_density {max_density}" if density > max_density else None)
        if reason is None and weight.dtype != torch.float32:
            reason = f"weight dtype {weight.dtype}: the kernels train float32 weights"
        decisions.append(LayerDecision(name, layer_type, tuple(weight.shape), density, reason is None,
                                       reason or "trainable SparseLinear (pattern fixed)"))
        if reason is None:
            replacements.append((name, SparseLinear(PanelCSRMatrix.from_dense(weight), bias, trainable=True)))
    for name, layer in replacements:
        replace_module(trainable, name, layer)
    if holder is not None:
        trainable, decisions = trainable[0], _unheld(decisions)
    return trainable, ConversionReport(decisions, output_check="not checked: for_training copies the weights exactly")


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


def looks_like_embedding(name: str) -> bool:
    """Whether a parameter's module name says it is an embedding table (`convert_file` has no model to ask)."""
    return any(part in segment.lower() for segment in name.split(".") for part in EMBEDDING_NAME_PARTS)


def convert_file(source: str | Path, target: str | Path, *, batch_sizes: Sequence[int] = (1, 64, 256),
                 min_speedup: float = 1.05, max_density: float = 0.7,
                 repeats: int = 5) -> tuple[ConversionReport, int]:
    """Convert a safetensors state dict (or a `sparsearch.save` checkpoint) to a sparse file, no model needed.

    Every 2-D floating `<name>.weight` is treated as a Linear layer (with `<name>.bias` if present) and
    decided like `convert` does, except embedding tables (by name: see `looks_like_embedding`); everything
    else is copied dense. `load_sparse(target, model)` runs a stored layer sparse only where the model's
    module there is a Linear it may replace, so the file loads into the model whatever was decided here.
    Returns the report and the size of the written file in bytes.
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
        if looks_like_embedding(name):
            density = float((tensor != 0).float().mean())
            decisions.append(LayerDecision(name, "Embedding", tuple(tensor.shape), density, False,
                                           "embedding table (by its name): stored by its non-zeros, runs dense"))
            continue
        decision, sparse = _decide_weight(name, "Linear", tensor, state.get(f"{name}.bias"), batch_sizes,
                                          min_speedup, max_density, repeats)
        decisions.append(decision)
        if decision.sparse:
            sparse_modules[name] = sparse
    kept = {k: v for k, v in state.items() if k.rpartition(".")[0] not in sparse_modules or
            k.rpartition(".")[2] == "bias"}
    tensors, entries = compact_state(kept, sparse_modules)
    return ConversionReport(decisions, "not checked: no model given"), write_sparse_file(tensors, entries, target)


__all__ = ["ConversionReport", "LayerDecision", "convert", "convert_file", "convert_with_report",
           "looks_like_embedding", "output_difference", "to_int8"]
