"""The settings of a one-shot pruning run, validated once so every later stage can trust them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sparsearch.oneshot.owl import check_owl_settings

Method = Literal["magnitude", "wanda", "sparsegpt"]
Budget = Literal["layer", "row"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# Per-layer budget for magnitude (the classic rule); per-row for the activation-aware methods, as their papers do.
DEFAULT_BUDGET: dict[str, Budget] = {"magnitude": "layer", "wanda": "row", "sparsegpt": "layer"}


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Parse an N:M pattern such as "2:4" into (N kept, M group size)."""
    match = _PATTERN.match(pattern)
    if match is None:
        raise ValueError(f"pattern {pattern!r} is not N:M; allowed: two integers such as '2:4' or '4:8'")
    kept, group = int(match.group(1)), int(match.group(2))
    if not 0 < kept < group:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M (N weights kept in every group of M)")
    return kept, group


@dataclass(frozen=True)
class OneShotConfig:
    """What to prune and how.

    ``sparsity`` is the fraction of zero weights in every pruned layer. With an N:M ``pattern`` the sparsity
    is 1 - N/M and may be left out. ``budget`` says whether the fraction holds per layer or per output row of
    unstructured masks (``None``: the method's usual choice). ``dsnot`` refines the method's mask with DSnoT.
    """

    method: Method = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    budget: Budget | None = None
    dsnot: bool = False
    sparsegpt_block_size: int = 128
    sparsegpt_dampening: float = 0.01
    dsnot_max_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_variance_power: float = 1.0
    owl: bool = False
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        if self.method not in DEFAULT_BUDGET:
            raise ValueError(f"method {self.method!r} is unknown; allowed: {', '.join(DEFAULT_BUDGET)}")
        if self.budget is not None and self.budget not in ("layer", "row"):
            raise ValueError(f"budget {self.budget!r} is unknown; allowed: 'layer' or 'row'")
        if self.sparsegpt_block_size < 1 or self.sparsegpt_dampening <= 0:
            raise ValueError(
                f"SparseGPT needs block size >= 1 and dampening > 0, got {self.sparsegpt_block_size} and "
                f"{self.sparsegpt_dampening}"
            )
        if self.dsnot_max_cycles < 0 or self.dsnot_threshold < 0 or self.dsnot_variance_power < 0:
            raise ValueError("DSnoT's max cycles, threshold and variance power must be >= 0")
        if self.pattern is not None:
            kept, group = parse_pattern(self.pattern)
            implied = 1 - kept / group
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means sparsity "
                    f"{implied:g}); give the pattern alone or a matching sparsity"
                )
        elif self.sparsity is None:
            raise ValueError("give a sparsity in [0, 1) or an N:M pattern such as '2:4'")
        elif not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity {self.sparsity} is outside the allowed range [0, 1)")
        if self.owl:
            if self.pattern is not None:
                raise ValueError(
                    f"OWL allocates unstructured sparsity per block; it cannot be combined with the N:M pattern "
                    f"{self.pattern} (which fixes every layer's sparsity): give --sparsity instead"
                )
            check_owl_settings(self.target_sparsity, self.owl_m, self.owl_lambda)

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros every pruned layer should end with (with OWL: on average)."""
        if self.pattern is not None:
            kept, group = parse_pattern(self.pattern)
            return 1 - kept / group
        assert self.sparsity is not None
        return self.sparsity

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, ``None`` for unstructured pruning."""
        return None if self.pattern is None else parse_pattern(self.pattern)

    @property
    def effective_budget(self) -> Budget:
        """The budget actually used for unstructured masks."""
        return self.budget or DEFAULT_BUDGET[self.method]

    @property
    def label(self) -> str:
        """A short name such as ``wanda+dsnot 2:4`` for tables."""
        name = f"{self.method}+dsnot" if self.dsnot else self.method
        name = f"{name}+owl" if self.owl else name
        return f"{name} {self.pattern}" if self.pattern else f"{name} {self.target_sparsity:g}"
