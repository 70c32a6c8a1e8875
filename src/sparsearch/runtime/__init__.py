"""Sparse inference on the CPU: the panel-CSR format, its kernels, `SparseLinear`, `convert`, and sparse files.

    fast = sparsearch.runtime.convert(model)          # Linear -> SparseLinear where measured faster
    sparsearch.runtime.save_sparse(fast, "m.safetensors")
    again = sparsearch.runtime.load_sparse("m.safetensors", build_model())
"""

from sparsearch.runtime.convert import ConversionReport, LayerDecision, convert, convert_file, convert_with_report
from sparsearch.runtime.format import PanelCSRMatrix
from sparsearch.runtime.kernels import get_backend, sparse_linear, sparse_matmul_t
from sparsearch.runtime.modules import SparseLinear
from sparsearch.runtime.storage import load_sparse, read_sparse_file, save_sparse

__all__ = [
    "ConversionReport",
    "LayerDecision",
    "PanelCSRMatrix",
    "SparseLinear",
    "convert",
    "convert_file",
    "convert_with_report",
    "get_backend",
    "load_sparse",
    "read_sparse_file",
    "save_sparse",
    "sparse_linear",
    "sparse_matmul_t",
]
