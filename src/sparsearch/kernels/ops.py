"""`torch.ops.sparsearch.panel_csr_linear`: the sparse forward as a PyTorch operator, for `torch.compile`.

The kernels are called through ctypes on data pointers, which TorchDynamo cannot trace: compiling a model with
`SparseLinear` layers used to split its graph at every layer (graph breaks on the backend lookup, its lock and
`torch.get_num_threads`). Registered as an operator with a shape function, a layer is one node of the
compiled graph, so the code between the layers (attention, norms, activations) is compiled whole. Eager calls do not
go through it: the dispatcher's way back into Python costs about 14 us a call, half the kernel of a small layer.

Inference only (no autograd formula): `SparseLinear` uses its autograd Function when gradients are wanted.
`activation_bits` is the int8 batch-1 input precision as `format.activation_bits_code` writes it (0: "auto").
"""

from __future__ import annotations

import torch

from sparsearch.kernels.cpu import sparse_linear
from sparsearch.kernels.format import PanelCSRMatrix, activation_bits_from_code, check_activation_bits

# Defined with torch.library.Library rather than the @custom_op decorator: the decorator's wrapper (an autograd
# kernel that checks every input for requires_grad, then redispatches) cost 42 us a call against 14 us for the
# dispatcher's plain way into a Python kernel (a 384x384 layer at 90% and 18 rows, whose kernel takes about 30 us,
# same run): inside a compiled MiniLM, 36 such calls per sentence. No autograd kernel is registered (the CPU kernel
# refuses inputs that want gradients); SparseLinear uses its autograd Function whenever gradients are wanted.
_LIBRARY = torch.library.Library("sparsearch", "DEF")
_LIBRARY.define("panel_csr_linear(Tensor x, Tensor values, Tensor col_indices, Tensor segment_nnz, "
                "Tensor segment_ptr, Tensor row_nnz_prefix, Tensor? scales, Tensor? bitmap, Tensor? segment_sums, "
                "Tensor? bias, int rows, int cols, int panel_width, int activation_bits=16) -> Tensor")


def _panel_csr_linear_cpu(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                          segment_nnz: torch.Tensor, segment_ptr: torch.Tensor, row_nnz_prefix: torch.Tensor,
                          scales: torch.Tensor | None, bitmap: torch.Tensor | None,
                          segment_sums: torch.Tensor | None, bias: torch.Tensor | None, rows: int, cols: int,
                          panel_width: int, activation_bits: int = 16) -> torch.Tensor:
    """y = x W^T + bias for W given by the arrays of a `PanelCSRMatrix` (bitmap, and for int8 segment_sums: for the
    batch-1 bitmap kernels; None to derive them here)."""
    # with no autograd kernel registered, PyTorch would run this and only warn, at backward, that the gradients
    # through it are missing: refuse here instead (the check costs well under a microsecond)
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        raise RuntimeError("sparsearch::panel_csr_linear has no gradient: call it under torch.no_grad(), or call the "
                           "SparseLinear layer, which computes gradients through its own autograd Function")
    expected = torch.int8 if scales is not None else torch.float32
    if values.dtype != expected:
        raise TypeError(f"the sparse kernels read {expected} values here, got {values.dtype} (a layer converted "
                        "with .to() / .double() / .half(): keep SparseLinear float32 on the CPU)")
    _check_layout(values, col_indices, segment_nnz, segment_ptr, row_nnz_prefix, rows, cols, panel_width)
    # the arrays' contents are not validated per call (SparseLinear's buffers are, when the layer is built); the
    # checks above are the cheap ones that keep the kernels inside the arrays they are given
    bits = activation_bits_from_code(activation_bits)  # 0: "auto"
    check_activation_bits(bits, scales is not None)
    matrix = PanelCSRMatrix((rows, cols), panel_width, values, col_indices, segment_nnz, segment_ptr,
                            row_nnz_prefix, scales, bits)
    # derived once by the layer, not per call (a float32 matrix has no segment sums)
    if bitmap is not None:
        _check_bitmap(bitmap, rows, cols, panel_width)
        matrix.__dict__["bitmap"] = bitmap
    if segment_sums is not None:
        matrix.__dict__["segment_sums"] = segment_sums
    return sparse_linear(x, matrix, bias)


_LIBRARY.impl("panel_csr_linear", _panel_csr_linear_cpu, "CPU")


@torch.library.register_fake("sparsearch::panel_csr_linear")
def _panel_csr_linear_shape(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                            segment_nnz: torch.Tensor, segment_ptr: torch.Tensor, row_nnz_prefix: torch.Tensor,
                            scales: torch.Tensor | None, bitmap: torch.Tensor | None, segment_sums: torch.Tensor | None,
                            bias: torch.Tensor | None, rows: int, cols: int, panel_width: int,
                            activation_bits: int = 16) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], rows), dtype=torch.float32)


panel_csr_linear = torch.ops.sparsearch.panel_csr_linear


def _check_layout(values: torch.Tensor, col_indices: torch.Tensor, segment_nnz: torch.Tensor,
                  segment_ptr: torch.Tensor, row_nnz_prefix: torch.Tensor, rows: int, cols: int, panel_width: int
                  ) -> None:
    """Raise ValueError naming the array whose type or length does not fit the others (an operator called by hand, or
    a program whose buffers were edited)."""
    if not 1 <= panel_width <= 65535 or rows < 0 or cols < 0:
        raise ValueError(f"shape ({rows}, {cols}) with panel_width {panel_width} is not a panel-CSR layout")
    panels = max(-(-cols // panel_width), 1)
    problems = []
    if col_indices.dtype != torch.uint16 or col_indices.numel() != values.numel():
        problems.append(f"col_indices: {col_indices.dtype} x {col_indices.numel()}, expected torch.uint16 x "
                        f"{values.numel()} (one per value)")
    if segment_nnz.numel() != panels * rows:
        problems.append(f"segment_nnz: {segment_nnz.numel()} entries, expected {panels * rows}")
    if segment_ptr.dtype != torch.int64 or segment_ptr.numel() != panels * rows + 1:
        problems.append(f"segment_ptr: {segment_ptr.dtype} x {segment_ptr.numel()}, expected torch.int64 x "
                        f"{panels * rows + 1}")
    elif int(segment_ptr[-1]) != values.numel():
        problems.append(f"segment_ptr ends at {int(segment_ptr[-1])}, expected {values.numel()} (the values)")
    if row_nnz_prefix.dtype != torch.int64 or row_nnz_prefix.numel() != rows + 1:
        problems.append(f"row_nnz_prefix: {row_nnz_prefix.dtype} x {row_nnz_prefix.numel()}, expected torch.int64 x "
                        f"{rows + 1}")
    if problems:
        raise ValueError("sparsearch::panel_csr_linear got arrays that do not fit together: " + "; ".join(problems))


def _check_bitmap(bitmap: torch.Tensor, rows: int, cols: int, panel_width: int) -> None:
    """Raise ValueError unless `bitmap` has the type and length of the layout's (one int64 word per 64 columns of
    every segment): the kernel reads that many words."""
    words = max(-(-cols // panel_width), 1) * rows * -(-panel_width // 64)
    if bitmap.dtype != torch.int64 or bitmap.numel() != words or not bitmap.is_contiguous():
        raise ValueError(f"sparsearch::panel_csr_linear got a bitmap of {bitmap.dtype} x {bitmap.numel()}, expected "
                         f"contiguous torch.int64 x {words} for a {rows}x{cols} layout with panel_width {panel_width}")
