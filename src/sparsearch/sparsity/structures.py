"""Structures: which patterns a mask may take (unstructured, N:M, block, output channel).

A structure turns a score tensor and a keep budget into a boolean mask of the same shape. Structured patterns
keep whole units (groups, blocks, channels), so the budget is rounded to whole units; N:M ignores the budget
and keeps exactly N of every M consecutive weights along the input dimension.

Layout: a weight of shape ``(out, in, *kernel)`` is viewed with its input channels last, i.e. as rows
``(out, *kernel)`` of length ``in`` for N:M (groups of M consecutive input channels, the layout sparse tensor
cores use), and as a matrix ``(out, in * prod(kernel))`` for blocks and channels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from sparsearch.sparsity.masks import topk_mask


@runtime_checkable
class Structure(Protocol):
    """A family of allowed mask patterns."""

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise ValueError naming ``name`` if a weight of ``shape`` cannot take this pattern."""
        ...

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Boolean mask of ``scores``' shape keeping about ``keep`` of the highest-scoring units."""
        ...


@dataclass(frozen=True)
class Unstructured:
    """Any set of individual weights (exact counts)."""

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        return None

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        return topk_mask(scores, keep)

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """N of every M consecutive weights along the input dimension are kept (e.g. 2:4 = 50% sparsity)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 2 or not 1 <= self.n < self.m:
            raise ValueError(f"N:M needs integers 1 <= N < M and M >= 2, got N={self.n}, M={self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(f"N:M sparsity needs a weight with an input dimension; {name!r} has shape {shape}")
        if shape[1] % self.m:
            raise ValueError(
                f"{self} sparsity needs the input dimension of {name!r} to be divisible by M={self.m}; "
                f"its shape is {shape} (input dimension {shape[1]})"
            )

    def mask(self, scores: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        self.check("weight", tuple(scores.shape))
        # put input channels last: (out, in, *k) -> (out, *k, in), then groups of m consecutive inputs
        order = [0, *range(2, scores.dim()), 1]
        grouped = scores.detach().float().permute(order).reshape(-1, self.m)
        kept = grouped.topk(self.n, dim=1, sorted=False).indices
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, kept, True)
        permuted_shape = [scores.shape[i] for i in order]
        inverse = [order.index(i) for i in range(scores.dim())]
        return mask.reshape(permuted_shape).permute(inverse).contiguous()

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def _as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(shape[0]), math.prod(shape[1:]) if len(shape) > 1 else 1


@dataclass(frozen=True)
class Block:
    """Whole ``rows x cols`` blocks of the (out, in * kernel) weight matrix, scored by their mean score."""

    rows: int = 4
    cols: int = 4

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block size must be positive, got {self.rows}x{self.cols}")

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        out, inner = _as_matrix_shape(shape)
        if out % self.rows or inner % self.cols:
            raise ValueError(
                f"block {self.rows}x{self.cols} sparsity needs {name!r} (matrix {out}x{inner}, shape {shape}) "
                f"to be divisible into blocks"
            )

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        out, inner = _as_matrix_shape(tuple(scores.shape))
        self.check("weight", tuple(scores.shape))
        blocks = scores.detach().float().reshape(out // self.rows, self.rows, inner // self.cols, self.cols)
        block_scores = blocks.mean(dim=(1, 3))
        keep_blocks = min(round(keep / (self.rows * self.cols)), block_scores.numel())
        kept = topk_mask(block_scores, keep_blocks)
        return kept[:, None, :, None].expand_as(blocks).reshape(scores.shape).contiguous()

    def __str__(self) -> str:
        return f"block{self.rows}x{self.cols}"


@dataclass(frozen=True)
class Channel:
    """Whole output channels (rows), scored by the sum of their scores."""

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        return None

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        out, inner = _as_matrix_shape(tuple(scores.shape))
        row_scores = scores.detach().float().reshape(out, inner).sum(dim=1)
        kept_rows = topk_mask(row_scores, min(round(keep / inner), out))
        return kept_rows[:, None].expand(out, inner).reshape(scores.shape).contiguous()

    def __str__(self) -> str:
        return "channel"


STRUCTURES = ("unstructured", "N:M (e.g. 2:4)", "blockRxC (e.g. block4x4)", "channel")


def parse_structure(spec: str | Structure) -> Structure:
    """A structure from its name: "unstructured", "2:4", "block4x4", "channel", or a Structure object."""
    if isinstance(spec, Unstructured | NM | Block | Channel):
        return spec
    if not isinstance(spec, str):
        if isinstance(spec, Structure):
            return spec
        raise TypeError(f"structure must be a string or a Structure, got {type(spec).__name__}")
    text = spec.strip().lower()
    if text == "unstructured":
        return Unstructured()
    if text == "channel":
        return Channel()
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        return NM(int(match[1]), int(match[2]))
    if match := re.fullmatch(r"block(\d+)x(\d+)", text):
        return Block(int(match[1]), int(match[2]))
    raise ValueError(f"unknown structure {spec!r}; allowed: {', '.join(STRUCTURES)}")
