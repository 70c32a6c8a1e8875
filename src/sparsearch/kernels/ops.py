"""`torch.ops.sparsearch.panel_csr_linear`: the sparse forward as a PyTorch operator, for `torch.compile`.

The kernels are called through ctypes on data pointers, which TorchDynamo cannot trace: compiling a model with
`SparseLinear` layers used to split its graph at every layer (graph breaks on the backend lookup, its lock and
`torch.get_num_threads`). Registered as an operator with a shape function, a layer is one node of the
compiled graph, so the code between the layers (attention, norms, activations) is compiled whole. Eager calls do not
go through it: the dispatcher's way back into Python costs about as much as the kernel of a small layer.

Inference only (no autograd formula): `SparseLinear` uses its autograd Function when gradients are wanted.
"""

from __future__ import annotations

import torch

from sparsearch.kernels.cpu import BITMAP_MIN_DENSITY, sparse_linear
from sparsearch.kernels.format import PanelCSRMatrix


@torch.library.custom_op("sparsearch::panel_csr_linear", mutates_args=())
def panel_csr_linear(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, segment_nnz: torch.Tensor,
                     segment_ptr: torch.Tensor, row_nnz_prefix: torch.Tensor, scales: torch.Tensor | None,
                     bitmap: torch.Tensor | None, lane_sums: torch.Tensor | None, bias: torch.Tensor | None,
                     rows: int, cols: int, panel_width: int) -> torch.Tensor:
    """y = x W^T + bias for W given by the arrays of a `PanelCSRMatrix` (bitmap and lane_sums: those of an int8
    matrix, for its batch-1 kernel; None to derive them here)."""
    expected = torch.int8 if scales is not None else torch.float32
    if values.dtype != expected:
        raise TypeError(f"the sparse kernels read {expected} values here, got {values.dtype} (a layer converted "
                        "with .to() / .double() / .half(): keep SparseLinear float32 on the CPU)")
    # built without validation: the arrays come from a validated matrix (SparseLinear's buffers)
    matrix = PanelCSRMatrix((rows, cols), panel_width, values, col_indices, segment_nnz, segment_ptr,
                            row_nnz_prefix, scales)
    if bitmap is not None and lane_sums is not None:  # derived once by the layer, not per call
        matrix.__dict__["bitmap"] = bitmap
        matrix.__dict__["lane_sums"] = lane_sums
    return sparse_linear(x, matrix, bias)


@panel_csr_linear.register_fake
def _panel_csr_linear_shape(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                            segment_nnz: torch.Tensor, segment_ptr: torch.Tensor, row_nnz_prefix: torch.Tensor,
                            scales: torch.Tensor | None, bitmap: torch.Tensor | None, lane_sums: torch.Tensor | None,
                            bias: torch.Tensor | None, rows: int, cols: int, panel_width: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], rows), dtype=torch.float32)


def uses_bitmap(matrix: PanelCSRMatrix) -> bool:
    """Whether the int8 batch-1 kernel reads this matrix's column bitmaps (see cpu.BITMAP_MIN_DENSITY)."""
    return matrix.is_int8 and matrix.density >= BITMAP_MIN_DENSITY
