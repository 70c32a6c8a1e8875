"""Sparse models on the CPU: `convert` (layers onto the kernels where measured faster), `SparseConv1d/2d`, int8,
`for_training`, transformers conversion and sparse files; the panel-CSR format, its kernels and `SparseLinear` live
in `sparsearch.kernels` (below the training loop, which trains on them) and are re-exported here.

    fast = sparsearch.runtime.convert(model, example_batch)  # Linear/Conv -> sparse layers where measured faster
    sparsearch.runtime.save_sparse(fast, "m.safetensors")
    again = sparsearch.runtime.load_sparse("m.safetensors", build_model())

    model, tokenizer, report = sparsearch.runtime.convert_transformers("pruned-model-dir")   # transformers models
    trainable, report = sparsearch.runtime.for_training(masked_model)  # train the pattern on the kernels
"""

from sparsearch.kernels.cpu import get_backend, sparse_linear, sparse_linear_values_grad, sparse_matmul_t
from sparsearch.kernels.format import PanelCSRMatrix
from sparsearch.kernels.modules import FusedActivation, SparseLinear
from sparsearch.runtime.conv import SparseConv1d, SparseConv2d
from sparsearch.runtime.convert import (
    ConversionReport,
    LayerDecision,
    convert,
    convert_file,
    convert_with_report,
    for_training,
    to_int8,
)
from sparsearch.runtime.hf import convert_transformers, load_transformers, save_transformers
from sparsearch.runtime.storage import load_sparse, read_sparse_file, save_sparse

__all__ = [
    "ConversionReport",
    "FusedActivation",
    "LayerDecision",
    "PanelCSRMatrix",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLinear",
    "convert",
    "convert_file",
    "convert_transformers",
    "convert_with_report",
    "for_training",
    "get_backend",
    "load_sparse",
    "load_transformers",
    "read_sparse_file",
    "save_sparse",
    "save_transformers",
    "sparse_linear",
    "sparse_linear_values_grad",
    "sparse_matmul_t",
    "to_int8",
]
