"""`SparseConv1d` / `SparseConv2d`: inference-only drop-ins for `nn.Conv1d` / `nn.Conv2d` with a sparse weight.

How a convolution becomes one sparse matrix product per image, without an im2col copy: the padded image is
kept as it is in memory, (channels, rows, cols) contiguous, and output position (i, j) is computed on a grid
as wide as the padded row (row stride `Wq`), so output position b = i * Wq + j reads input element
`offset(c, ki, kj) + b` with offset = c * Hq * Wq + ki * dilation_h * Wq + kj * dilation_w. That is the batched
kernel's X^T layout (`xt + col * ldx + b`, b contiguous) with one "virtual column" per (channel, kernel
position): the weight becomes a (out_channels x channels * Hq * Wq) panel-CSR matrix with the same non-zeros,
whose column indices are those offsets. The kernel then writes Y^T = (out_channels x wide positions), i.e. the
image's output in NCHW order with Wq - Wo unused columns per row, which one strided copy removes. An im2col
(F.unfold) copy of the input was as slow as the whole dense convolution for a 64->128 3x3 layer on 32x32
maps, and putting the batch innermost (one kernel call for all images) needs an output transpose that took
longer than the kernel; so the kernel runs once per image.

Stride s > 1: each image is split into s_h * s_w phases (rows i * s_h + a, cols j * s_w + b), each phase a
contiguous (rows / s_h, cols / s_w) block, so a strided convolution reads each phase at stride 1 (one extra
input copy). Groups: a grouped convolution is the same matrix with each output channel's non-zeros in its own
group's channels (block diagonal), so any `groups` works. The virtual matrix depends on the input's spatial
size, so it is built on first use for each size and kept (a few sizes per layer).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from sparsearch.kernels.cpu import check_bias, get_backend
from sparsearch.kernels.format import MAX_PANEL_WIDTH, PanelCSRMatrix

SIZES_KEPT = 8  # virtual matrices kept per layer (one per input spatial size seen)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


def _pair(value: int | tuple[int, ...], dims: int) -> tuple[int, int]:
    """A 1-D layer's (v,) as (1, v) (it runs as a 2-D convolution over one row), a 2-D layer's (h, w) as is."""
    values = (value,) * dims if isinstance(value, int) else tuple(value)
    return (1, *values) if dims == 1 else (values[0], values[1])


class _SparseConvNd(nn.Module):
    """Shared by `SparseConv1d` and `SparseConv2d`; see the module docstring for the computation."""

    _dims: int
    _dense_type: type[nn.Module]

    def __init__(self, matrix: PanelCSRMatrix, bias: torch.Tensor | None, in_channels: int,
                 kernel_size: tuple[int, ...], stride: tuple[int, ...] = (1,), padding: tuple[int, ...] | str = (0,),
                 dilation: tuple[int, ...] = (1,), groups: int = 1, padding_mode: str = "zeros",
                 reversed_padding: list[int] | tuple[int, ...] | None = None) -> None:
        super().__init__()
        matrix.validate()
        if matrix.is_int8:
            raise ValueError("sparse convolutions compute with float32 values; got an int8 matrix")
        kernel = tuple(kernel_size)
        if len(kernel) != self._dims:
            raise ValueError(f"kernel_size must have {self._dims} entries, got {kernel_size!r}")
        if groups < 1 or in_channels % groups or matrix.rows % groups:
            raise ValueError(f"groups must divide in_channels={in_channels} and out_channels={matrix.rows}, "
                             f"got {groups}")
        if matrix.cols != in_channels // groups * math.prod(kernel):
            raise ValueError(f"matrix has {matrix.cols} columns; a {in_channels // groups}-channel x "
                             f"{'x'.join(map(str, kernel))} kernel needs {in_channels // groups * math.prod(kernel)}")
        if bias is not None:
            check_bias(bias, matrix.rows)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, matrix.rows
        self.kernel_size, self.stride, self.padding = kernel, tuple(stride), padding
        self.dilation, self.groups, self.padding_mode = tuple(dilation), groups, padding_mode
        if reversed_padding is None:  # F.pad order (last dimension first), as nn.Conv*d computes it
            if isinstance(padding, str):
                raise ValueError("give reversed_padding for string padding (use from_conv)")
            reversed_padding = [p for p in reversed(padding) for _ in range(2)]
        self._pads = tuple(int(p) for p in reversed_padding) + ((0, 0) if self._dims == 1 else ())
        self.panel_width = matrix.panel_width
        self.register_buffer("values", matrix.values)
        self.register_buffer("col_indices", matrix.col_indices)
        self.register_buffer("segment_nnz", matrix.segment_nnz)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self._matrix = matrix
        self._virtual: OrderedDict[tuple[int, int], tuple[PanelCSRMatrix | None, int]] = OrderedDict()
        self._dense_weight: torch.Tensor | None = None

    @classmethod
    def from_conv(cls, conv: nn.Module, matrix: PanelCSRMatrix | None = None) -> _SparseConvNd:
        """Keep the exact non-zeros of `conv.weight` (or use `matrix`, its weight as out x in/groups*kernel)."""
        if not isinstance(conv, cls._dense_type):
            raise TypeError(f"expected an nn.{cls._dense_type.__name__}, got {type(conv).__name__}")
        if matrix is None:
            matrix = PanelCSRMatrix.from_dense(conv.weight.detach().reshape(conv.out_channels, -1))
        return cls(matrix, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.padding_mode, conv._reversed_padding_repeated_twice)

    @property
    def matrix(self) -> PanelCSRMatrix:
        """The weight as a (out_channels x in_channels/groups * kernel positions) panel-CSR matrix."""
        return self._matrix

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def nnz(self) -> int:
        return self._matrix.nnz

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "weight":
            raise AttributeError(f"{type(self).__name__} holds no dense weight; call .to_dense_conv() for an "
                                 f"nn.{self._dense_type.__name__}")
        return super().__getattr__(name)

    def to_dense_conv(self) -> nn.Module:
        """The equivalent dense convolution (for comparisons and for tools without sparse support)."""
        conv = self._dense_type(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                self.dilation, self.groups, self.bias is not None, self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(self._matrix.to_dense().reshape(self.weight_shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _phases(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """(Hq, Wq, Ho, Wo, padded height, padded width) for an input of height x width."""
        (kh, kw), (sh, sw), (dh, dw) = _pair(self.kernel_size, self._dims), self._stride2, self._dilation2
        hp = height + self._pads[2] + self._pads[3]
        wp = width + self._pads[0] + self._pads[1]
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"input of spatial size {(height, width)[2 - self._dims:]} is smaller than the "
                             f"dilated kernel {self.kernel_size} after padding")
        return -(-hp // sh), -(-wp // sw), ho, wo, hp, wp

    @property
    def _stride2(self) -> tuple[int, int]:
        return _pair(self.stride, self._dims)

    @property
    def _dilation2(self) -> tuple[int, int]:
        return _pair(self.dilation, self._dims)

    def _virtual_matrix(self, hq: int, wq: int) -> tuple[PanelCSRMatrix | None, int]:
        """(matrix over virtual columns, ldx) for phase blocks of hq x wq; None if the weight has no non-zeros."""
        key = (hq, wq)
        if key in self._virtual:
            self._virtual.move_to_end(key)
            return self._virtual[key]
        (kh, kw), (sh, sw), (dh, dw) = _pair(self.kernel_size, self._dims), self._stride2, self._dilation2
        dense = self._matrix.to_dense()
        rows, cols = dense.nonzero(as_tuple=True)
        values = dense[rows, cols]
        group_channels = self.in_channels // self.groups
        channel = rows // (self.out_channels // self.groups) * group_channels + cols // (kh * kw)
        ki, kj = cols % (kh * kw) // kw * dh, cols % kw * dw
        offsets = (((channel * sh + ki % sh) * sw + kj % sw) * hq + ki // sh) * wq + kj // sw
        if offsets.numel() == 0:
            entry: tuple[PanelCSRMatrix | None, int] = (None, 1)
        else:
            # a common factor of every offset becomes the row stride ldx: fewer virtual columns, fewer panels
            ldx = math.gcd(*offsets.unique().tolist(), self.in_channels * sh * sw * hq * wq)
            virtual = offsets // ldx
            ncols = self.in_channels * sh * sw * hq * wq // ldx
            panels = -(-ncols // MAX_PANEL_WIDTH)
            width = -(-ncols // panels)
            panel, local = virtual // width, virtual % width
            order = torch.argsort((panel * self.out_channels + rows) * width + local)
            segment = torch.bincount(panel * self.out_channels + rows, minlength=panels * self.out_channels)
            matrix = PanelCSRMatrix.from_arrays(
                (self.out_channels, ncols), width, values[order].contiguous(),
                local[order].to(torch.int32).to(torch.uint16),
                segment.reshape(panels, self.out_channels).to(torch.int32).to(torch.uint16))
            entry = (matrix, ldx)
        self._virtual[key] = entry
        while len(self._virtual) > SIZES_KEPT:
            self._virtual.popitem(last=False)
        return entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"{type(self).__name__} is inference-only: gradients do not flow through the sparse "
                               "kernels; call it under torch.no_grad() or on an input without requires_grad")
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"sparse kernels compute in float32 on the CPU; got {x.dtype} on {x.device}")
        if x.dim() not in (self._dims + 1, self._dims + 2) or x.shape[-self._dims - 1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects (batch, {self.in_channels}, *spatial) or "
                             f"({self.in_channels}, *spatial) with {self._dims} spatial dims, got {tuple(x.shape)}")
        unbatched = x.dim() == self._dims + 1
        x4 = x.detach().reshape(-1, self.in_channels, *(1,) * (2 - self._dims), *x.shape[-self._dims:])
        backend = get_backend()
        if backend.name != "c":  # the virtual-column trick needs raw pointers: numba gets the dense convolution
            y = self._dense_forward(x4)
        else:
            y = self._sparse_forward(x4, backend)
        y = y.reshape(y.shape[0], self.out_channels, *y.shape[-self._dims:])
        return y[0] if unbatched else y

    def _dense_forward(self, x4: torch.Tensor) -> torch.Tensor:
        if self._dense_weight is None:
            warnings.warn(f"{type(self).__name__}: the C kernels are unavailable, so this layer runs as a dense "
                          "convolution", RuntimeWarning, stacklevel=3)
            self._dense_weight = self._matrix.to_dense().reshape(self.out_channels, -1, *_pair(self.kernel_size,
                                                                                              self._dims))
        padded = F.pad(x4, self._pads, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        return F.conv2d(padded, self._dense_weight, self.bias, self._stride2, 0, self._dilation2, self.groups)

    def _sparse_forward(self, x4: torch.Tensor, backend: object) -> torch.Tensor:
        images, channels, height, width = x4.shape
        hq, wq, ho, wo, hp, wp = self._phases(height, width)
        (sh, sw) = self._stride2
        if self.padding_mode == "zeros":  # one copy pads both the convolution's and the phases' extra zeros
            padded = F.pad(x4, (self._pads[0], self._pads[1] + wq * sw - wp, self._pads[2],
                                self._pads[3] + hq * sh - hp))
        else:
            padded = F.pad(F.pad(x4, self._pads, mode=self.padding_mode), (0, wq * sw - wp, 0, hq * sh - hp))
        if sh * sw > 1:  # [n, c, i, a, j, b] -> [n, c, a, b, i, j]: each phase a contiguous block
            padded = padded.reshape(images, channels, hq, sh, wq, sw).permute(0, 1, 3, 5, 2, 4)
        padded = padded.contiguous()
        matrix, ldx = self._virtual_matrix(hq, wq)
        wide = (ho - 1) * wq + wo  # output positions i * wq + j; the last row stops at wo so reads stay inside
        if matrix is None:
            y = x4.new_zeros(images, self.out_channels, ho, wo)
            return y if self.bias is None else y + self.bias[:, None, None]
        out = torch.empty(images, self.out_channels, wide, dtype=torch.float32)
        backend.shifted_matmul_t(matrix, self.bias, padded, ldx, wide, out)
        return out.as_strided((images, self.out_channels, ho, wo), (self.out_channels * wide, wide, wq, 1)).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, nnz={self.nnz}, "
                f"density={self._matrix.density:.3f}, bias={self.bias is not None}")


class SparseConv1d(_SparseConvNd):
    """`nn.Conv1d` computed from the non-zeros of its weight only; inference only, holds no dense weight."""

    _dims = 1
    _dense_type = nn.Conv1d


class SparseConv2d(_SparseConvNd):
    """`nn.Conv2d` computed from the non-zeros of its weight only; inference only, holds no dense weight."""

    _dims = 2
    _dense_type = nn.Conv2d


SPARSE_CONV_TYPES: dict[type[nn.Module], type[_SparseConvNd]] = {nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d}


def sparse_conv_for(module: nn.Module) -> type[_SparseConvNd] | None:
    """The sparse class that can replace `module` (an nn.Conv1d or nn.Conv2d, not a subclass), or None."""
    return SPARSE_CONV_TYPES.get(type(module))
