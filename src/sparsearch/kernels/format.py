"""The sparse weight format of the runtime: column-panelled CSR (`PanelCSRMatrix`).

A weight matrix (rows = output features, cols = input features) is cut into column panels of at most
`panel_width` columns. Inside a panel, the non-zeros of each row are stored CSR-style with column indices
local to the panel, so indices always fit in uint16 whatever the layer width. Panels keep the slice of the
activations that the kernel touches inside the L2 cache for large layers (measured in
benchmarks/runtime_kernels.py); layers no wider than one panel are plain CSR.

Storage per non-zero: 4 bytes (float32 value) + 2 bytes (uint16 index), plus 2 bytes per (panel, row) segment
for its length. `quantize()` stores the values as int8 with one float32 scale per segment (symmetric: the
segment's largest |weight| / 127), i.e. per output row and column panel of up to 1024 inputs, finer than the
usual per-output-channel int8 scale: 1 + 2 bytes per non-zero + 6 per segment. One scale per segment (rather than
per 32 stored non-zeros, an earlier layout) lets the batch-1 kernel sum a whole segment in integers and scale
once (csrc/sparse_kernels.c, "int8 bitmap kernel").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

DEFAULT_MAX_PANEL_WIDTH = 1024
MAX_PANEL_WIDTH = 65535
INT8_SCALES = "segment"  # what one int8 scale covers; recorded in files (storage.py)
# Input precision of the int8 batch-1 kernel: 16 (exact to 1/65534 of the input's largest |value|), 8 (dynamic 8-bit
# activations as in "W8A8" int8 inference: one dot-product instruction per 64 columns instead of two), or "auto" (the
# default): 8 for an input that rounding to 8 bits moves by at most 2% of its norm, else 16 (see `quantize`)
ACTIVATION_BITS = ("auto", 16, 8)


def check_activation_bits(bits: object, is_int8: bool = True) -> None:
    """Raise ValueError unless `bits` is one of ACTIVATION_BITS (int8 values) or 16 (float32 values)."""
    if isinstance(bits, bool) or bits not in ACTIVATION_BITS or (bits != 16 and not is_int8):
        raise ValueError(f"activation_bits must be one of {ACTIVATION_BITS} for int8 values and 16 for float32 "
                         f"values, got {bits!r} ({'int8' if is_int8 else 'float32'})")


def activation_bits_code(bits: int | str) -> int:
    """`bits` as the C kernels and the `panel_csr_linear` operator take it: 16, 8, or 0 for "auto"."""
    return 0 if bits == "auto" else int(bits)


def activation_bits_from_code(code: int) -> int | str:
    """The inverse of `activation_bits_code`."""
    return "auto" if code == 0 else code


def default_panel_width(cols: int) -> int:
    """Panel width for a layer with `cols` input features: one panel up to 1024 columns, else balanced panels."""
    if cols <= DEFAULT_MAX_PANEL_WIDTH:
        return max(cols, 1)
    panels = -(-cols // DEFAULT_MAX_PANEL_WIDTH)
    return -(-cols // panels)


@dataclass(frozen=True)
class PanelCSRMatrix:
    """A sparse float32 matrix in column-panelled CSR; build with `from_dense`, check with `validate`.

    segment_nnz[p, i] is the number of non-zeros of row i inside panel p; values and col_indices list them
    panel by panel, row by row. segment_ptr and row_nnz_prefix are derived offsets used by the kernels.
    """

    shape: tuple[int, int]
    panel_width: int
    values: torch.Tensor  # float32 [nnz]
    col_indices: torch.Tensor  # uint16 [nnz], local to the panel
    segment_nnz: torch.Tensor  # uint16 [panels, rows]
    segment_ptr: torch.Tensor  # int64 [panels * rows + 1]
    row_nnz_prefix: torch.Tensor  # int64 [rows + 1]
    scales: torch.Tensor | None = None  # float32 [panels, rows] (one per segment) when values are int8
    activation_bits: int | str = 16  # int8 only: see ACTIVATION_BITS and `quantize`

    def __reduce__(self) -> tuple:
        # copied and pickled (torch.save of a whole model) as its stored arrays, rebuilt on the other side: the
        # cached kernel_args hold data pointers of this object's arrays, and a pickle carried them stale
        return PanelCSRMatrix.from_arrays, (self.shape, self.panel_width, self.values, self.col_indices,
                                            self.segment_nnz, self.scales, self.activation_bits)

    @property
    def is_int8(self) -> bool:
        return self.scales is not None

    @cached_property
    def float_values(self) -> torch.Tensor:
        """The values as float32 (dequantised if int8)."""
        if self.scales is None:
            return self.values
        return self.values.to(torch.float32) * self.scales.reshape(-1)[self._segment_of_entry]

    @cached_property
    def _segment_of_entry(self) -> torch.Tensor:
        """Flat segment index (panel * rows + row) of every stored non-zero."""
        counts = self.segment_nnz.to(torch.int64).reshape(-1)
        return torch.repeat_interleave(torch.arange(counts.numel()), counts)

    @cached_property
    def _row_major_segment_of_entry(self) -> torch.Tensor:
        """Segment of every stored non-zero numbered row by row (row * panels + panel), the order of `bitmap` and
        `segment_sums`; `_segment_of_entry` numbers them panel by panel."""
        segment = self._segment_of_entry
        rows = max(self.rows, 1)
        return (segment % rows) * self.panels + segment // rows

    def _entry_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the whole matrix of every stored non-zero, in storage order (not cached: 16 bytes per
        non-zero, where the matrix itself takes 6)."""
        segment = self._segment_of_entry
        rows = max(self.rows, 1)
        return segment % rows, (segment // rows) * self.panel_width + self.col_indices.to(torch.int64)

    def quantize(self, activation_bits: int | str = "auto") -> PanelCSRMatrix:
        """This matrix with int8 values and a float32 scale per segment (symmetric, largest |weight| -> 127).

        `activation_bits`: how the batch-1 kernel (one input row per call, e.g. a decoder's generation steps)
        quantises each input, with one scale per call: 16; 8, the dynamic int8 activations of W8A8 inference, faster
        (one dot-product instruction per 64 columns instead of two) at the cost of an input error up to 1/254 of the
        input's largest |value|, which an input with outlier features feels most; or "auto" (default): 8 bits for an
        input whose 8-bit rounding moves it by at most 2% of its norm (Gaussian inputs lose about 1%), 16 for one
        with outliers, decided per call from the input alone (one pass over it). Batches of several rows compute
        with float32 inputs either way."""
        check_activation_bits(activation_bits)
        if self.is_int8:
            return self if self.activation_bits == activation_bits else replace(self, activation_bits=activation_bits)
        segments = self._segment_of_entry
        top = torch.zeros(self.segment_nnz.numel(), dtype=torch.float32)
        top.scatter_reduce_(0, segments, self.values.abs(), reduce="amax")
        scales = torch.where(top > 0, top / 127.0, torch.ones_like(top))
        q = torch.round(self.values / scales[segments]).clamp(-127, 127).to(torch.int8)
        return PanelCSRMatrix.from_arrays(self.shape, self.panel_width, q, self.col_indices, self.segment_nnz,
                                          scales=scales.reshape(self.segment_nnz.shape),
                                          activation_bits=activation_bits)

    @cached_property
    def bitmap(self) -> torch.Tensor:
        """Column bitmaps of the segments, int64 [rows * panels * ceil(panel_width / 64)], row-major (a row's
        bitmaps are one stream): bit j of word w of segment (p, i) is set when column 64 w + j of panel p holds a
        non-zero of row i. Derived (not stored in files); the int8 batch-1 kernel reads it instead of the column
        indices (see csrc/sparse_kernels.c)."""
        words = -(-self.panel_width // 64)
        columns = self.col_indices.to(torch.int64)
        bitmap = torch.zeros(self.segment_nnz.numel() * words, dtype=torch.int64)
        # distinct powers of two: their sum is their bitwise or (bit 63 wraps to the sign bit, as intended)
        bitmap.index_add_(0, self._row_major_segment_of_entry * words + columns // 64,
                          torch.ones_like(columns) << (columns % 64))
        return bitmap

    @cached_property
    def segment_sums(self) -> torch.Tensor:
        """Sum of the int8 values of each segment, int32 [rows * panels], row-major like `bitmap`. The int8 batch-1
        kernel subtracts 32768 times these to undo the offset of its unsigned input bytes; they depend on the
        weights only, so they are derived once instead of summed in every call."""
        if self.scales is None:
            raise ValueError("segment_sums are defined for int8 values only (call quantize() first)")
        sums = torch.zeros(self.segment_nnz.numel(), dtype=torch.int64)
        sums.index_add_(0, self._row_major_segment_of_entry, self.values.to(torch.int64))
        return sums.to(torch.int32)

    @cached_property
    def _transpose_plan(self) -> tuple[PanelCSRMatrix, torch.Tensor]:
        """W^T's structure (its own values array) and `order`, with W^T.values == W.values[order]."""
        if self.is_int8:
            raise ValueError("an int8 matrix has one scale per row segment and cannot be transposed; "
                             "transpose the float32 matrix")
        rows, cols = self.shape
        row, col = self._entry_positions()
        width = default_panel_width(rows)  # W^T's rows are W's columns and its columns W's rows
        panels = max(-(-rows // width), 1)
        # W^T's storage order: by its panel (a block of W's rows), then its row (W's column), then W's row
        order = torch.argsort(((row // width) * cols + col) * width + row % width)
        segment_nnz = torch.bincount((row // width) * cols + col, minlength=panels * cols).reshape(panels, cols)
        transposed = PanelCSRMatrix.from_arrays((cols, rows), width, self.values[order],
                                                (row % width)[order].to(torch.int32).to(torch.uint16),
                                                segment_nnz.to(torch.int32).to(torch.uint16))
        return transposed, order

    def transposed(self) -> PanelCSRMatrix:
        """W^T with W's current values: what the gradient of the input of y = x W^T is computed with.

        The structure and the permutation of the values are derived once; the values are gathered again on every
        call into the same array (a training step changes them in place), so keep the result only until W changes."""
        transposed, order = self._transpose_plan
        torch.index_select(self.values, 0, order, out=transposed.values)
        return transposed

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def panels(self) -> int:
        return int(self.segment_nnz.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(self.rows * self.cols, 1)

    @cached_property
    def kernel_args(self) -> tuple[int, ...]:
        """Sizes and data pointers in the order the C kernels take them (computed once: calls are hot)."""
        arrays = (self.segment_ptr, self.row_nnz_prefix, self.col_indices, self.values)
        scales = None if self.scales is None else self.scales.data_ptr()
        return (self.rows, self.panels, self.panel_width, *(a.data_ptr() for a in arrays), scales)

    @property
    def storage_bytes(self) -> int:
        """Bytes of the stored arrays (values, indices, segment lengths, scales); offsets are rebuilt on load."""
        arrays = (self.values, self.col_indices, self.segment_nnz) + (() if self.scales is None else (self.scales,))
        return sum(t.numel() * t.element_size() for t in arrays)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, panel_width: int | None = None) -> PanelCSRMatrix:
        """Keep the exact non-zeros of a 2-D weight (masked or pruned weights have exact zeros)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {type(weight).__name__} "
                             f"with shape {tuple(getattr(weight, 'shape', ()))}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got dtype {weight.dtype}")
        rows, cols = weight.shape
        width = default_panel_width(cols) if panel_width is None else panel_width
        if not 1 <= width <= MAX_PANEL_WIDTH:
            raise ValueError(f"panel_width must be in [1, {MAX_PANEL_WIDTH}], got {width}")
        panels = max(-(-cols // width), 1)
        dense = weight.detach().to(device="cpu", dtype=torch.float32)
        padded = torch.zeros(rows, panels * width, dtype=torch.float32)
        padded[:, :cols] = dense
        by_panel = padded.view(rows, panels, width).permute(1, 0, 2)  # [panels, rows, width]
        nonzero = by_panel != 0
        positions = nonzero.nonzero()  # sorted by (panel, row, col): the storage order
        values = by_panel[positions[:, 0], positions[:, 1], positions[:, 2]].contiguous()
        col_indices = positions[:, 2].to(torch.int32).to(torch.uint16)
        segment_nnz = nonzero.sum(dim=2).to(torch.int32).to(torch.uint16)
        return cls.from_arrays((rows, cols), width, values, col_indices, segment_nnz)

    @classmethod
    def from_mask(cls, weight: torch.Tensor, mask: torch.Tensor, panel_width: int | None = None) -> PanelCSRMatrix:
        """The entries of `weight` where `mask` is true, zeros included (a kept weight that is exactly 0 stays in
        the pattern, so training can move it; `from_dense` would drop it)."""
        if not isinstance(mask, torch.Tensor) or not isinstance(weight, torch.Tensor) or mask.shape != weight.shape:
            raise ValueError(f"weight and mask must be tensors of one shape, got {tuple(getattr(weight, 'shape', ()))} "
                             f"and {tuple(getattr(mask, 'shape', ()))}")
        structure = cls.from_dense(mask.detach().to(device="cpu", dtype=torch.float32), panel_width)
        values = structure.gather(weight.detach().to(device="cpu", dtype=torch.float32))
        return cls.from_arrays(structure.shape, structure.panel_width, values, structure.col_indices,
                               structure.segment_nnz)

    @classmethod
    def from_arrays(cls, shape: tuple[int, int], panel_width: int, values: torch.Tensor,
                    col_indices: torch.Tensor, segment_nnz: torch.Tensor,
                    scales: torch.Tensor | None = None, activation_bits: int | str = 16) -> PanelCSRMatrix:
        """Assemble from the stored arrays and derive the offsets; call `validate` on untrusted input."""
        counts = segment_nnz.to(torch.int64)
        segment_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
        torch.cumsum(counts.reshape(-1), 0, out=segment_ptr[1:])
        row_nnz_prefix = torch.zeros(shape[0] + 1, dtype=torch.int64)
        if counts.numel():
            torch.cumsum(counts.sum(dim=0), 0, out=row_nnz_prefix[1:])
        return cls((int(shape[0]), int(shape[1])), int(panel_width), values.contiguous(),
                   col_indices.contiguous(), segment_nnz.contiguous(), segment_ptr, row_nnz_prefix,
                   None if scales is None else scales.contiguous(), activation_bits)

    def validate(self) -> None:
        """Raise ValueError if the arrays do not describe a valid matrix (checked before any kernel reads them)."""
        rows, cols = self.shape
        if rows < 0 or cols < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        if not 1 <= self.panel_width <= MAX_PANEL_WIDTH:
            raise ValueError(f"panel_width must be in [1, {MAX_PANEL_WIDTH}], got {self.panel_width}")
        panels = max(-(-cols // self.panel_width), 1)
        expected = {"values": torch.int8 if self.is_int8 else torch.float32, "col_indices": torch.uint16,
                    "segment_nnz": torch.uint16}
        for name, dtype in expected.items():
            tensor = getattr(self, name)
            if tensor.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
        if tuple(self.segment_nnz.shape) != (panels, rows):
            raise ValueError(f"segment_nnz must have shape {(panels, rows)} for a {rows}x{cols} matrix with "
                             f"panel width {self.panel_width}, got {tuple(self.segment_nnz.shape)}")
        if self.values.dim() != 1 or self.col_indices.shape != self.values.shape:
            raise ValueError(f"values and col_indices must be 1-D of equal length, got "
                             f"{tuple(self.values.shape)} and {tuple(self.col_indices.shape)}")
        if self.scales is not None:
            if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != (panels, rows):
                raise ValueError(f"scales must be float32 of shape {(panels, rows)} (one per segment), got "
                                 f"{self.scales.dtype} {tuple(self.scales.shape)}")
            if not bool(torch.isfinite(self.scales).all()):
                raise ValueError("scales must be finite")
        check_activation_bits(self.activation_bits, self.is_int8)
        counts = self.segment_nnz.to(torch.int64)
        panel_widths = torch.clamp(cols - torch.arange(panels) * self.panel_width, max=self.panel_width)
        if bool((counts > panel_widths[:, None]).any()):
            raise ValueError("a segment of segment_nnz holds more non-zeros than its panel has columns")
        total = int(counts.sum())
        if total != self.nnz:
            raise ValueError(f"segment_nnz sums to {total} non-zeros but {self.nnz} values are stored")
        if total:
            panel_of_entry = torch.repeat_interleave(torch.arange(panels), counts.sum(dim=1))
            if bool((self.col_indices.to(torch.int64) >= panel_widths[panel_of_entry]).any()):
                raise ValueError(f"column index out of range for a matrix with {cols} columns")

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """dense[i, j] at every stored entry (i, j), in storage order: from a [rows, cols] tensor such as a masked
        weight or an optimizer's state of one."""
        return dense[self._entry_positions()].contiguous()

    def scatter(self, entries: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Write `entries` (one per stored entry, in storage order) into the [rows, cols] tensor `dense` at their
        positions, in place; returns `dense` (the inverse of `gather` on the stored positions)."""
        dense[self._entry_positions()] = entries
        return dense

    def to_dense(self) -> torch.Tensor:
        """The dense float32 matrix (for checks and for layers that fall back to dense)."""
        rows, cols = self.shape
        dense = torch.zeros(rows, self.panels * self.panel_width, dtype=torch.float32)
        self.scatter(self.float_values, dense)
        return dense[:, :cols].contiguous()
