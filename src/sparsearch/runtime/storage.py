"""Sparse model files: safetensors holding only the non-zeros, their indices and per-segment counts.

A file is a model's `state_dict()` after `convert`: for each `SparseLinear` the arrays `<layer>.values`
(float32), `<layer>.col_indices` (uint16) and `<layer>.segment_nnz` (uint16), every other tensor dense.
The header metadata records the format version, each sparse layer's shape and panel width, and a CRC32 of
every tensor, so a corrupted or truncated file raises a ValueError instead of producing wrong numbers.
Loading needs no pickle: `load_sparse(path, model)` fills an instance of the model's architecture.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparsearch.runtime.format import PanelCSRMatrix
from sparsearch.runtime.modules import SparseLinear

FORMAT_NAME = "sparsearch-runtime"
FORMAT_VERSION = "1"
_SPARSE_ARRAYS = ("values", "col_indices", "segment_nnz")


def _crc32(tensor: torch.Tensor) -> int:
    flat = tensor.detach().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else 0


def save_sparse(model: nn.Module, path: str | Path) -> int:
    """Write `model` (typically the output of `convert`) to a safetensors file; returns the file size in bytes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: {"shape": [m.out_features, m.in_features], "panel_width": m.panel_width,
                     "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    return write_sparse_file(model.state_dict(), layers, path)


def write_sparse_file(state: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]], path: str | Path) -> int:
    """Write a state dict whose `layers` hold sparse arrays (see module docstring); returns the size in bytes."""
    # clone: tied/shared tensors must become separate entries for safetensors
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sparse_layers": json.dumps(layers),
        "crc32": json.dumps({key: _crc32(value) for key, value in tensors.items()}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path.stat().st_size


def read_sparse_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, PanelCSRMatrix]]:
    """Read and verify a sparse file: (all tensors by state_dict key, validated sparse matrices by layer name)."""
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
        layers: dict[str, dict[str, Any]] = json.loads(metadata["sparse_layers"])
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
    for name, info in layers.items():
        keys = [f"{name}.{array}" for array in _SPARSE_ARRAYS]
        if any(key not in tensors for key in keys):
            raise ValueError(f"{str(path)!r} lacks the arrays {keys} of sparse layer {name!r}")
        try:
            shape = (int(info["shape"][0]), int(info["shape"][1]))
            matrix = PanelCSRMatrix.from_arrays(shape, int(info["panel_width"]), *(tensors[k] for k in keys))
            matrix.validate()
        except (KeyError, TypeError, IndexError, RuntimeError, ValueError) as error:
            raise ValueError(f"{str(path)!r}: sparse layer {name!r} is invalid: {error}") from error
        matrices[name] = matrix
    return tensors, matrices


def load_sparse(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a file written by `save_sparse` into `model`, an instance of the same architecture (dense is fine).

    Layers stored sparse replace the model's `nn.Linear` of the same name by `SparseLinear`; if the model has
    a different layer type there (e.g. an Embedding), the weight is loaded densely into it. The model is
    returned in eval mode with gradients off.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, matrices = read_sparse_file(path)
    dense_state = {k: v for k, v in tensors.items()
                   if k.rpartition(".")[0] not in matrices or k.rpartition(".")[2] not in _SPARSE_ARRAYS}
    sparse_names = set()
    for name, matrix in matrices.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{str(path)!r} holds sparse layer {name!r} but the model has no such module") from error
        if tuple(getattr(module, "weight", torch.empty(0)).shape) != matrix.shape and not isinstance(
                module, SparseLinear):
            raise ValueError(f"sparse layer {name!r} has shape {matrix.shape} but the model's "
                             f"{type(module).__name__} there has weight shape "
                             f"{tuple(getattr(module, 'weight', torch.empty(0)).shape)}")
        bias = dense_state.pop(f"{name}.bias", None)
        if isinstance(module, nn.Linear | SparseLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, SparseLinear(matrix, bias))
            sparse_names.add(name)
        else:
            dense_state[f"{name}.weight"] = matrix.to_dense()
            if bias is not None:
                dense_state[f"{name}.bias"] = bias
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in sparse_names}
    missing, unexpected = sorted(expected - set(dense_state)), sorted(set(dense_state) - expected)
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(dense_state, strict=False)
    model.eval()
    model.requires_grad_(False)
    return model
