"""`SparseLinear`: a drop-in for `nn.Linear` whose weight lives in `PanelCSRMatrix` form, for inference and for
training with a fixed sparsity pattern (forward and backward on the sparse kernels)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from sparsearch.kernels.cpu import (
    activation_code,
    apply_activation,
    check_bias,
    sparse_linear,
    sparse_linear_values_grad,
    uses_bitmap,
)
from sparsearch.kernels.format import PanelCSRMatrix, activation_bits_code
from sparsearch.kernels.ops import panel_csr_linear


class _SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W's stored values as an input, so autograd reaches them: every product on the kernels
    (input gradient: G W through W^T; values' gradient: the sampled product of G^T and x at W's non-zeros)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,  # type: ignore[override]
                values: torch.Tensor, bias: torch.Tensor | None, matrix: PanelCSRMatrix) -> torch.Tensor:
        ctx.matrix = matrix
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return sparse_linear(x.detach(), matrix, None if bias is None else bias.detach())

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        matrix: PanelCSRMatrix = ctx.matrix
        grad_output = grad_output.to(torch.float32)
        grad_x = sparse_linear(grad_output, matrix.transposed()) if ctx.needs_input_grad[0] else None
        grad_values = sparse_linear_values_grad(x, grad_output, matrix) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, matrix.rows).sum(0)
        return grad_x, grad_values, grad_bias, None


class SparseLinear(nn.Module):
    """y = x W^T + b computed from the non-zeros of W only; holds no dense weight.

    The sparse arrays are registered as buffers (`trainable=False`, for inference) or, for `values` and `bias`, as
    parameters (`trainable=True`: any optimizer trains the stored non-zeros, the pattern stays fixed); either way
    `.state_dict()` carries them. Gradients flow through the kernels to the input (and to the values and bias when
    trainable). The kernels read the values array in place, so optimizers must update parameters in place (all of
    torch.optim's do); int8 layers are inference-only. The first backward pass derives W^T's structure and keeps it
    (about as many bytes again as the layer's sparse arrays).

    `activation` (one of `sparsearch.kernels.cpu.ACTIVATIONS`: "relu", "gelu", "gelu_tanh") makes the layer
    compute act(x W^T + b), in the kernels' own call when it runs on them. `fusion_key` pairs the layer with the
    `FusedActivation` that stands in for the model's activation module after it (see `sparsearch.runtime.fusion`).
    """

    def __init__(self, matrix: PanelCSRMatrix, bias: torch.Tensor | None = None, trainable: bool = False,
                 activation: str | None = None, fusion_key: int | None = None) -> None:
        super().__init__()
        matrix.validate()
        self.set_activation(activation, fusion_key)
        if bias is not None:
            check_bias(bias, matrix.rows)
        if trainable and matrix.is_int8:
            raise ValueError("an int8 SparseLinear cannot be trainable: train the float32 layer, then quantize")
        self.in_features = matrix.cols
        self.out_features = matrix.rows
        self.panel_width = matrix.panel_width
        bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        if trainable:  # values share the matrix's storage: an in-place update is what the kernels read
            self.values = nn.Parameter(matrix.values)
            self.register_parameter("bias", None if bias is None else nn.Parameter(bias.clone()))  # a copy
        else:
            self.register_buffer("values", matrix.values)
            self.register_buffer("bias", bias)
        self.register_buffer("col_indices", matrix.col_indices)
        self.register_buffer("segment_nnz", matrix.segment_nnz)
        self.register_buffer("scales", matrix.scales)  # None (not in the state dict) unless the values are int8
        self._matrix = matrix
        if uses_bitmap(matrix):  # derived now: inside a torch.compile trace their computation would join the graph
            _ = matrix.bitmap, matrix.segment_sums if matrix.is_int8 else None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_activation_code" not in self.__dict__:  # pickled before layers had activations
            self.set_activation(None)
        # copy.deepcopy clones a Parameter's data on its own (nn.Parameter.__deepcopy__), apart from the matrix's
        # copy of the same array: share the trained values with the kernels again
        values = (self._parameters if "values" in self._parameters else self._buffers)["values"]
        if values.data_ptr() != self._matrix.values.data_ptr():
            self._matrix = dataclasses.replace(self._matrix, values=values.detach())

    def set_activation(self, activation: str | None, fusion_key: int | None = None) -> None:
        """Apply `activation` (None: none) to this layer's outputs; `fusion_key`: the key of the `FusedActivation`
        that skips its own work on them (None: no such module)."""
        code = activation_code(activation)
        if fusion_key is not None and (code == 0 or isinstance(fusion_key, bool) or not isinstance(fusion_key, int)):
            raise ValueError(f"fusion_key must be an int, given with an activation; got {fusion_key!r} with "
                             f"activation {activation!r}")
        self.activation, self.fusion_key, self._activation_code = activation, fusion_key, code

    @classmethod
    def from_linear(cls, linear: nn.Linear, panel_width: int | None = None, trainable: bool = False
                    ) -> SparseLinear:
        """Keep the exact non-zeros of `linear.weight` (a masked or pruned layer); `trainable`: see the class."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        matrix = PanelCSRMatrix.from_dense(linear.weight, panel_width)
        return cls(matrix, linear.bias, trainable=trainable)

    @property
    def trainable(self) -> bool:
        return isinstance(self.values, nn.Parameter)

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
        # _parameters / _buffers read directly: attribute access to them goes through two Python-level
        # __getattr__ calls (this class's and nn.Module's), microseconds a call where a small layer's kernel at one
        # sentence takes about 20
        tensors = self._parameters if "values" in self._parameters else self._buffers
        values, bias, matrix = tensors["values"], tensors.get("bias"), self._matrix
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                                  or (bias is not None and bias.requires_grad))
        code = self._activation_code
        if torch.compiler.is_compiling() and not wants_grad:
            y = self._operator_forward(x, values, bias)
            # a traced graph cannot carry the mark below, so the FusedActivation after a fused layer does the work
            return y if self.fusion_key is not None else apply_activation(y, code)
        if values.data_ptr() != matrix.values.data_ptr():
            raise RuntimeError("SparseLinear.values is no longer the array the kernels read: it was replaced (by "
                               "assigning .data, or by .to() / .half() / .double()) instead of updated in place; "
                               "update parameters in place (torch.optim does) and keep the layer float32 on the CPU")
        if wants_grad:
            if matrix.is_int8:
                raise RuntimeError("an int8 SparseLinear is inference-only: gradients do not flow through the int8 "
                                   "kernels; call it under torch.no_grad() or on an input without requires_grad")
            y = apply_activation(_SparseLinearFunction.apply(x, values, bias, matrix), code)
        else:
            y = sparse_linear(x, matrix, bias, activation=self.activation)
        if self.fusion_key is not None:  # read by the FusedActivation of this key: this output is activated
            y.__dict__[FUSION_MARK] = self.fusion_key
        return y

    def _operator_forward(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer as one `torch.ops.sparsearch.panel_csr_linear` node (for torch.compile and torch.export), on
        its registered tensors so that an exported program refers to the layer's buffers."""
        buffers, matrix = self._buffers, self._matrix
        bitmap = uses_bitmap(matrix)
        return panel_csr_linear(x, values, buffers["col_indices"], buffers["segment_nnz"], matrix.segment_ptr,
                                matrix.row_nnz_prefix, buffers["scales"], matrix.bitmap if bitmap else None,
                                matrix.segment_sums if bitmap and matrix.is_int8 else None, bias, matrix.rows,
                                matrix.cols, matrix.panel_width, activation_bits_code(matrix.activation_bits))

    def to_dense_linear(self) -> nn.Linear:
        """The equivalent dense `nn.Linear` (for comparisons and for exporting to tools without sparse support); a
        layer with an activation has none (ValueError: the Linear would not apply it)."""
        if self.activation is not None and self.fusion_key is None:
            raise ValueError(f"this layer applies {self.activation!r} itself, which an nn.Linear does not: follow "
                             f"the Linear by the activation")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self._matrix.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self._matrix.density:.3f}, bias={self.bias is not None}"
                + (f", int8 (batch-1 inputs in {_input_bits(self._matrix.activation_bits)})" if self._matrix.is_int8
                   else "")
                + (f", activation={self.activation}" if self.activation else "")
                + (f" (fused, key {self.fusion_key})" if self.fusion_key is not None else ""))


# the attribute a fused layer sets on its output tensor (its key), which its FusedActivation looks for
FUSION_MARK = "_sparsearch_fusion_key"


class FusedActivation(nn.Module):
    """Stands in for an activation module whose work the `SparseLinear` before it (same `fusion_key`) does in its own
    kernel call: an output of that layer passes through unchanged; any other input (a dense layer's, a traced
    graph's, anything the model feeds it that the conversion did not see) gets the original `activation`."""

    def __init__(self, activation: nn.Module, fusion_key: int) -> None:
        super().__init__()
        self.activation = activation
        self.fusion_key = fusion_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and x.__dict__.get(FUSION_MARK) == self.fusion_key:
            # a view, not x: the mark stays with x (activated however often x comes here) but not with what this
            # returns (which, given to this module again, gets the activation again)
            return x.view_as(x)
        return self.activation(x)

    def extra_repr(self) -> str:
        return f"fusion_key={self.fusion_key}"


def _input_bits(activation_bits: int | str) -> str:
    return "8 or 16 bits, chosen per input" if activation_bits == "auto" else f"{activation_bits} bits"


def linear_like(module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """(type name, weight as [out, in], bias) for layers `SparseLinear` can replace; None otherwise."""
    if isinstance(module, nn.Linear):
        return "Linear", module.weight, module.bias
    # transformers' Conv1D (GPT-2): y = x @ W + b with W stored [in, out]; matched by name so that transformers
    # stays an optional dependency
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "Conv1D", module.weight.t(), module.bias
    return None


