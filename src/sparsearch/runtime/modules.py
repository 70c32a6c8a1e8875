"""`SparseLinear`: an inference-only drop-in for `nn.Linear` whose weight lives in `PanelCSRMatrix` form."""

from __future__ import annotations

import torch
from torch import nn

from sparsearch.runtime.format import PanelCSRMatrix
from sparsearch.runtime.kernels import sparse_linear


class SparseLinear(nn.Module):
    """y = x W^T + b computed from the non-zeros of W only; holds no dense weight.

    The sparse arrays are registered as buffers, so `.state_dict()` carries them; gradients do not flow
    through the kernels (inference only).
    """

    def __init__(self, matrix: PanelCSRMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        matrix.validate()
        if bias is not None and tuple(bias.shape) != (matrix.rows,):
            raise ValueError(f"bias must have shape ({matrix.rows},), got {tuple(bias.shape)}")
        self.in_features = matrix.cols
        self.out_features = matrix.rows
        self.panel_width = matrix.panel_width
        self.register_buffer("values", matrix.values)
        self.register_buffer("col_indices", matrix.col_indices)
        self.register_buffer("segment_nnz", matrix.segment_nnz)
        self.register_buffer("scales", matrix.scales)  # None (not in the state dict) unless the values are int8
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self._matrix = matrix

    @classmethod
    def from_linear(cls, linear: nn.Linear, panel_width: int | None = None) -> SparseLinear:
        """Keep the exact non-zeros of `linear.weight` (a masked or pruned layer)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        matrix = PanelCSRMatrix.from_dense(linear.weight, panel_width)
        return cls(matrix, linear.bias)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "weight":  # a parent that reads .weight itself (nn.MultiheadAttention) cannot use this layer
            raise AttributeError("SparseLinear holds no dense weight: its parent reads .weight directly, so this "
                                 "layer must stay an nn.Linear (sparsearch.runtime.convert keeps such layers dense; "
                                 "call .to_dense_linear() to undo a manual replacement)")
        return super().__getattr__(name)

    @property
    def matrix(self) -> PanelCSRMatrix:
        return self._matrix

    @property
    def nnz(self) -> int:
        return self._matrix.nnz

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("SparseLinear is inference-only: gradients do not flow through the sparse "
                               "kernels; call it under torch.no_grad() or on an input without requires_grad")
        return sparse_linear(x, self._matrix, self.bias)

    def to_dense_linear(self) -> nn.Linear:
        """The equivalent dense `nn.Linear` (for comparisons and for exporting to tools without sparse support)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self._matrix.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self._matrix.density:.3f}, bias={self.bias is not None}"
                + (", int8" if self._matrix.is_int8 else ""))


def linear_like(module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """(type name, weight as [out, in], bias) for layers `SparseLinear` can replace; None otherwise."""
    if isinstance(module, nn.Linear):
        return "Linear", module.weight, module.bias
    # transformers' Conv1D (GPT-2): y = x @ W + b with W stored [in, out]; matched by name so that transformers
    # stays an optional dependency
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "Conv1D", module.weight.t(), module.bias
    return None


