"""The sparse kernels and the layer built on them, below every package that computes with them.

`PanelCSRMatrix` (format.py), the C / numba CPU kernels (cpu.py, csrc/sparse_kernels.c: forward, the W^T product
and the values' gradient) and `SparseLinear` (modules.py: inference, or training with the pattern fixed). They import
nothing else of sparsearch, so the training loop can train on them and the runtime can ship them;
`sparsearch.runtime` re-exports the public names.
"""

from sparsearch.kernels.cpu import get_backend, sparse_linear, sparse_linear_values_grad, sparse_matmul_t
from sparsearch.kernels.format import PanelCSRMatrix
from sparsearch.kernels.modules import SparseLinear, linear_like

__all__ = ["PanelCSRMatrix", "SparseLinear", "get_backend", "linear_like", "sparse_linear",
           "sparse_linear_values_grad", "sparse_matmul_t"]
