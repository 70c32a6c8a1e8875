"""numba versions of the panel-CSR kernels (fallback when no C compiler is available; same algorithm)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _balanced_rows(row_nnz_prefix: np.ndarray, rows: int, t: int, n: int) -> tuple[int, int]:
    total = row_nnz_prefix[rows]
    first = np.searchsorted(row_nnz_prefix[: rows + 1], total * t // n)
    last = rows if t == n - 1 else np.searchsorted(row_nnz_prefix[: rows + 1], total * (t + 1) // n)
    return min(first, rows), min(last, rows)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_t(rows: int, panel_width: int, segment_ptr: np.ndarray, row_nnz_prefix: np.ndarray,
             col_indices: np.ndarray, values: np.ndarray, bias: np.ndarray, xt: np.ndarray, yt: np.ndarray,
             threads: int) -> None:
    """yt[rows, batch] = W xt + bias (xt: [cols, batch])."""
    panels = (segment_ptr.shape[0] - 1) // max(rows, 1)
    batch = xt.shape[1]
    for t in prange(threads):
        first, last = _balanced_rows(row_nnz_prefix, rows, t, threads)
        for i in range(first, last):
            for b in range(batch):
                yt[i, b] = bias[i]
        for p in range(panels):
            base = p * panel_width
            for i in range(first, last):
                for k in range(segment_ptr[p * rows + i], segment_ptr[p * rows + i + 1]):
                    w = values[k]
                    c = base + np.int64(col_indices[k])
                    for b in range(batch):
                        yt[i, b] += w * xt[c, b]


@njit(parallel=True, fastmath=True, cache=True)
def matvec(rows: int, panel_width: int, segment_ptr: np.ndarray, row_nnz_prefix: np.ndarray,
           col_indices: np.ndarray, values: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray,
           threads: int) -> None:
    """y[rows] = W x + bias."""
    panels = (segment_ptr.shape[0] - 1) // max(rows, 1)
    for t in prange(threads):
        first, last = _balanced_rows(row_nnz_prefix, rows, t, threads)
        for i in range(first, last):
            total = np.float32(0.0)
            for p in range(panels):
                base = p * panel_width
                for k in range(segment_ptr[p * rows + i], segment_ptr[p * rows + i + 1]):
                    total += values[k] * x[base + np.int64(col_indices[k])]
            y[i] = total + bias[i]


@njit(parallel=True, fastmath=True, cache=True)
def sddmm(rows: int, panel_width: int, segment_ptr: np.ndarray, row_nnz_prefix: np.ndarray,
          col_indices: np.ndarray, xt: np.ndarray, gt: np.ndarray, grad: np.ndarray, threads: int) -> None:
    """grad[k] = gt[i] . xt[j] for every stored non-zero k = (i, j) (xt: [cols, batch], gt: [rows, batch])."""
    panels = (segment_ptr.shape[0] - 1) // max(rows, 1)
    batch = xt.shape[1]
    for t in prange(threads):
        first, last = _balanced_rows(row_nnz_prefix, rows, t, threads)
        for p in range(panels):
            base = p * panel_width
            for i in range(first, last):
                for k in range(segment_ptr[p * rows + i], segment_ptr[p * rows + i + 1]):
                    c = base + np.int64(col_indices[k])
                    total = np.float32(0.0)
                    for b in range(batch):
                        total += gt[i, b] * xt[c, b]
                    grad[k] = total
