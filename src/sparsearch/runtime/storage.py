"""Sparse model files: safetensors holding only the non-zeros, their indices and per-segment counts.

A file is a model's `state_dict()` after `convert` with every sparse-enough weight stored as the arrays
`<prefix>.values` (float32, or int8 with `<prefix>.scales`), `<prefix>.col_indices` (uint16) and
`<prefix>.segment_nnz` (uint16) of a `PanelCSRMatrix`: for a `SparseLinear` or `SparseConv1d/2d` (its weight as
out_channels x in_channels/groups * kernel positions, the conv's shape in `weight_shape`) the prefix is the layer's
name and it runs sparse after loading; for any other weight of 2 or more dims (a layer kept dense because dense
was faster, flattened to 2-D) the prefix is the parameter's name and it is expanded to dense on load. So the file
size follows the non-zeros whatever ran faster. Other tensors are stored dense. The header metadata records the
format version, each sparse entry's shape, panel width and execution mode (and the activation a layer applies itself,
with the activation module it stands in for: see sparsearch.runtime.fusion), and a CRC32 of every tensor, so a
corrupted or truncated file raises a ValueError instead of producing wrong numbers. Loading needs no pickle:
`load_sparse(path, model)` fills an instance of the model's architecture.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparsearch.engine.replaceable import reason_to_keep_dense, replace_module, shared_parameters
from sparsearch.kernels.cpu import ACTIVATIONS
from sparsearch.kernels.format import ACTIVATION_BITS, INT8_SCALES, PanelCSRMatrix
from sparsearch.kernels.modules import FusedActivation, SparseLinear, linear_like
from sparsearch.runtime.conv import SparseConv1d, SparseConv2d, sparse_conv_for
from sparsearch.runtime.fusion import activation_kind, fused_pairs, new_fusion_key

SparseModule = SparseLinear | SparseConv1d | SparseConv2d

FORMAT_NAME = "sparsearch-runtime"
FORMAT_VERSION = "1"
_SPARSE_ARRAYS = ("values", "col_indices", "segment_nnz")


def _key(prefix: str, leaf: str) -> str:
    """A layer's tensor's key as state_dict names it: `leaf` alone for the model itself (prefix ""), a model that is
    one layer; ".values" for it made such files unloadable."""
    return f"{prefix}.{leaf}" if prefix else leaf


def _crc32(tensor: torch.Tensor) -> int:
    flat = tensor.detach().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else 0


def _entry(matrix: PanelCSRMatrix, execute: str, weight_shape: tuple[int, ...]) -> dict[str, Any]:
    entry = {"shape": list(matrix.shape), "panel_width": matrix.panel_width, "execute": execute,
             "weight_shape": list(weight_shape)}
    if matrix.is_int8:
        entry["int8_scales"] = INT8_SCALES
        entry["int8_activation_bits"] = matrix.activation_bits
    return entry


def _arrays(matrix: PanelCSRMatrix) -> dict[str, torch.Tensor]:
    arrays = {name: getattr(matrix, name) for name in _SPARSE_ARRAYS}
    if matrix.is_int8:
        arrays["scales"] = matrix.scales
    return arrays


def compact_state(state: dict[str, torch.Tensor], sparse_modules: dict[str, SparseModule],
                  fused: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """State dict -> (tensors to write, sparse entries): weights stored sparse where that takes fewer bytes; `fused`:
    {sparse layer: the activation module fused into it} (`fusion.fused_pairs`)."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, module in sparse_modules.items():
        entries[name] = _entry(module.matrix, "sparse", module.weight_shape)
        if getattr(module, "activation", None) is not None:
            entries[name]["activation"] = module.activation
            if fused and name in fused:
                entries[name]["fused_activation"] = fused[name]
        tensors.update({_key(name, array): value for array, value in _arrays(module.matrix).items()})
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in sparse_modules and (leaf in _SPARSE_ARRAYS or leaf == "scales"):
            continue
        if leaf == "weight" and value.dim() >= 2 and value.is_floating_point():
            flat = value.detach().float().reshape(value.shape[0], -1)
            matrix = PanelCSRMatrix.from_dense(flat)
            if matrix.storage_bytes < value.numel() * value.element_size() and value.dtype == torch.float32:
                entries[key] = _entry(matrix, "dense", tuple(value.shape))
                tensors.update({_key(key, array): getattr(matrix, array) for array in _SPARSE_ARRAYS})
                continue
        tensors[key] = value
    return tensors, entries


def save_sparse(model: nn.Module, path: str | Path) -> int:
    """Write `model` (typically the output of `convert`) to a safetensors file; returns the file size in bytes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparse_modules = {name: m for name, m in model.named_modules() if isinstance(m, SparseModule)}
    tensors, entries = compact_state(model.state_dict(), sparse_modules, fused_pairs(model))
    return write_sparse_file(tensors, entries, path)


def write_sparse_file(tensors: dict[str, torch.Tensor], entries: dict[str, dict[str, Any]],
                      path: str | Path) -> int:
    """Write tensors and their sparse entries (see module docstring); returns the file size in bytes."""
    # clone: tied/shared tensors must become separate entries for safetensors
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sparse_entries": json.dumps(entries),
        "crc32": json.dumps({key: _crc32(value) for key, value in tensors.items()}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path.stat().st_size


def read_sparse_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, PanelCSRMatrix],
                                                dict[str, dict[str, Any]]]:
    """Read and verify a sparse file: (dense tensors by key, validated matrices by prefix, entry metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sparse model file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata: dict[str, str] = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (corrupted or truncated?): "
                         f"{error}") from error
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} is not a sparsearch sparse model file (metadata format="
                         f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has sparse format version {metadata.get('format_version')!r}; this "
                         f"sparsearch reads version {FORMAT_VERSION!r}")
    try:
        entries: dict[str, dict[str, Any]] = json.loads(metadata["sparse_entries"])
        checksums: dict[str, int] = json.loads(metadata["crc32"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} has damaged metadata: {error}") from error
    if set(checksums) != set(tensors):
        missing, extra = sorted(set(checksums) - set(tensors)), sorted(set(tensors) - set(checksums))
        raise ValueError(f"{str(path)!r} is damaged: tensors missing {missing}, unexpected {extra}")
    for key, tensor in tensors.items():
        if _crc32(tensor) != checksums[key]:
            raise ValueError(f"{str(path)!r} is corrupted: checksum mismatch in tensor {key!r}")
    matrices = {}
    for prefix, info in entries.items():
        keys = [_key(prefix, array) for array in _SPARSE_ARRAYS]
        if any(key not in tensors for key in keys):
            raise ValueError(f"{str(path)!r} lacks the arrays {keys} of sparse entry {prefix!r}")
        scales = None
        if "int8_group_size" in info:  # the first int8 layout: a scale per 32 stored non-zeros
            raise ValueError(f"{str(path)!r}: sparse entry {prefix!r} has int8 scales per "
                             f"{info['int8_group_size']!r} stored non-zeros (an earlier sparsearch); this sparsearch "
                             f"reads one scale per {INT8_SCALES}: convert the model again")
        if "int8_scales" in info:
            if info["int8_scales"] != INT8_SCALES:
                raise ValueError(f"{str(path)!r}: sparse entry {prefix!r} has int8 scales per "
                                 f"{info['int8_scales']!r}; this sparsearch reads one scale per {INT8_SCALES!r}")
            if _key(prefix, "scales") not in tensors:
                raise ValueError(f"{str(path)!r} lacks the int8 scales {_key(prefix, 'scales')!r} of sparse entry "
                                 f"{prefix!r}")
            scales = tensors.pop(_key(prefix, "scales"))
        activation_bits = info.get("int8_activation_bits", 16) if scales is not None else 16  # 16: files before
        if activation_bits not in ACTIVATION_BITS:
            raise ValueError(f"{str(path)!r}: sparse entry {prefix!r} has int8_activation_bits {activation_bits!r}; "
                             f"this sparsearch reads one of {ACTIVATION_BITS}")
        try:
            shape = (int(info["shape"][0]), int(info["shape"][1]))
            matrix = PanelCSRMatrix.from_arrays(shape, int(info["panel_width"]), *(tensors.pop(k) for k in keys),
                                                scales=scales, activation_bits=activation_bits)
            matrix.validate()
            weight_shape = [int(d) for d in info["weight_shape"]]
            if info["execute"] not in ("sparse", "dense") or math.prod(weight_shape) != shape[0] * shape[1]:
                raise ValueError(f"execute={info['execute']!r}, weight_shape={weight_shape}")
            if info.get("activation") not in ACTIVATIONS or ("fused_activation" in info) != (
                    info.get("activation") is not None and isinstance(info.get("fused_activation"), str)):
                raise ValueError(f"activation={info.get('activation')!r} (one of {ACTIVATIONS}), "
                                 f"fused_activation={info.get('fused_activation')!r} (a module name, only with one)")
        except (KeyError, TypeError, IndexError, RuntimeError, ValueError) as error:
            raise ValueError(f"{str(path)!r}: sparse entry {prefix!r} is invalid: {error}") from error
        matrices[prefix] = matrix
    return tensors, matrices, entries


def _load_sparse_conv(model: nn.Module, prefix: str, conv: nn.Module, matrix: PanelCSRMatrix, entry: dict[str, Any],
                      dense_state: dict[str, torch.Tensor], owners: dict[int, list[str]] | None,
                      ran_dense: list[str]) -> nn.Module | None:
    """The `SparseConv1d/2d` to put into `model` at `prefix` for a convolution stored sparse, or None after loading
    it into the dense `conv` when that may not be replaced (a tied weight; `owners` None: the model's layer is
    already sparse, so nothing is tied); its bias comes out of `dense_state`."""
    shape = tuple(conv.weight.shape)
    if tuple(entry["weight_shape"]) != shape or matrix.rows * matrix.cols != math.prod(shape):
        raise ValueError(f"sparse layer {prefix!r} has weight shape {tuple(entry['weight_shape'])} but the model's "
                         f"{type(conv).__name__} there has weight shape {shape}")
    bias = dense_state.pop(_key(prefix, "bias"), None)
    if (bias is None) != (conv.bias is None):
        raise ValueError(f"sparse layer {prefix!r} {'has' if bias is not None else 'lacks'} a bias but the model's "
                         f"{type(conv).__name__} there {'has none' if conv.bias is None else 'has one'}")
    reason = None if owners is None else reason_to_keep_dense(model, prefix, owners)
    if reason is not None:
        with torch.no_grad():
            conv.weight.copy_(matrix.to_dense().reshape(shape))
            if bias is not None:
                conv.bias.copy_(bias)
        ran_dense.append(f"{prefix} ({reason})")
        return None
    sparse = sparse_conv_for(conv).from_conv(conv, matrix)
    if bias is not None:
        sparse.bias.copy_(bias)
    return sparse


def _placed(model: nn.Module, prefix: str, module: nn.Module) -> nn.Module:
    """`model` with `module` at `prefix`; `module` itself for prefix "" (the model is that one layer)."""
    if not prefix:
        return module
    replace_module(model, prefix, module)
    return model


def _loaded_layer(model: nn.Module, prefix: str, matrix: PanelCSRMatrix, bias: torch.Tensor | None,
                  entry: dict[str, Any]) -> SparseLinear:
    """The `SparseLinear` of a sparse entry, with its activation; the activation module fused into it (named by the
    entry) is made its `FusedActivation` in `model`."""
    activation, fused = entry.get("activation"), entry.get("fused_activation")
    if fused is None:
        return SparseLinear(matrix, bias, activation=activation)
    try:
        module = model.get_submodule(fused)
    except AttributeError as error:
        raise ValueError(f"sparse layer {prefix!r} computes the activation module {fused!r}, which the model "
                         f"lacks") from error
    original = module.activation if isinstance(module, FusedActivation) else module
    if activation_kind(original) != activation:
        raise ValueError(f"sparse layer {prefix!r} computes {activation!r} for the module {fused!r}, but the "
                         f"model's {type(original).__name__} there computes {activation_kind(original)!r}")
    key = new_fusion_key()
    replace_module(model, fused, FusedActivation(original, key))
    return SparseLinear(matrix, bias, activation=activation, fusion_key=key)


def load_sparse(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a file written by `save_sparse` into `model`, an instance of the same architecture (dense is fine).

    Entries that ran sparse replace the model's `nn.Linear` (or GPT-2 `Conv1D`) of that name by `SparseLinear`
    and its `nn.Conv1d` / `nn.Conv2d` by `SparseConv1d` / `SparseConv2d`,
    unless the model may not have it replaced (its parent reads the weight, the weight is tied, or the module
    is not Linear-like: then it runs dense, with a warning); the others are expanded into the model's dense
    parameters. The model is returned in eval mode with gradients off (a model that is itself one layer stored
    sparse: its replacement is returned).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dense_state, matrices, entries = read_sparse_file(path)
    sparse_names = set()
    owners = shared_parameters(model)
    ran_dense = []
    for prefix, matrix in matrices.items():
        if entries[prefix]["execute"] == "dense":
            dense_state[prefix] = matrix.to_dense().reshape(entries[prefix]["weight_shape"])
            continue
        try:
            module = model.get_submodule(prefix)
        except AttributeError as error:
            raise ValueError(f"{str(path)!r} holds sparse layer {prefix!r} but the model has no such module") from error
        converted = isinstance(module, SparseConv1d | SparseConv2d)  # loading into an already converted model
        if converted or sparse_conv_for(module) is not None:
            sparse = _load_sparse_conv(model, prefix, module.to_dense_conv() if converted else module, matrix,
                                       entries[prefix], dense_state, None if converted else owners, ran_dense)
            if sparse is not None:
                model = _placed(model, prefix, sparse)
            sparse_names.add(prefix)
            continue
        view = linear_like(module)
        if isinstance(module, SparseLinear):
            shape = (module.out_features, module.in_features)
        elif view is not None:
            shape = tuple(view[1].shape)
        else:
            shape = tuple(getattr(module, "weight", torch.empty(0)).shape)
        if math.prod(shape) != matrix.rows * matrix.cols or (view is not None and shape != matrix.shape):
            raise ValueError(f"sparse layer {prefix!r} has shape {matrix.shape} but the model's "
                             f"{type(module).__name__} there has weight shape {shape}")
        reason = None if isinstance(module, SparseLinear) else (
            f"{type(module).__name__} is not a layer SparseLinear can replace" if view is None
            else reason_to_keep_dense(model, prefix, owners))
        if reason is not None and entries[prefix].get("activation") and "fused_activation" not in entries[prefix]:
            raise ValueError(f"sparse layer {prefix!r} applies {entries[prefix]['activation']!r} itself, but it cannot "
                             f"be replaced in this model ({reason}) and an nn.Linear would not apply it")
        if reason is not None:  # the file stays loadable: this layer runs dense (a fused activation module stays)
            weight = matrix.to_dense()
            dense_state[_key(prefix, "weight")] = weight.t() if view is not None and view[0] == "Conv1D" else \
                weight.reshape(module.weight.shape)
            ran_dense.append(f"{prefix} ({reason})")
            continue
        bias = dense_state.pop(_key(prefix, "bias"), None)
        model = _placed(model, prefix, _loaded_layer(model, prefix, matrix, bias, entries[prefix]))
        sparse_names.add(prefix)
    if ran_dense:
        warnings.warn(f"sparsearch.runtime.load_sparse: layers stored sparse run dense in this model: "
                      f"{'; '.join(ran_dense)}", UserWarning, stacklevel=2)
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in sparse_names}
    missing, unexpected = sorted(expected - set(dense_state)), sorted(set(dense_state) - expected)
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match the model: missing {missing}, unexpected {unexpected}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {shapes[k]}" for k, v in dense_state.items()
             if tuple(v.shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{str(path)!r} does not match the model's shapes: {'; '.join(wrong)}")
    model.load_state_dict(dense_state, strict=False)
    model.eval()
    model.requires_grad_(False)
    return model
