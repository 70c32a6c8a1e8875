"""Paired, interleaved timing of two ways to compute the same thing, robust to other jobs on the same cores.

Each round times both candidates back to back (in alternating order), and the speed-up is the median of the
per-round ratios: a burst of load hits both calls of a round alike, so it moves that round's ratio little, and
a median ignores the rounds it does distort. (Ratios of separately taken minima or medians are not paired: one
lucky dense call under load once produced a "389x" sparse speed-up.) The confidence is the fraction of rounds
that agree with the decision. A result close to the threshold, not confident, or faster than the work saved
allows is measured again with more rounds before anyone decides on it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedTiming:
    """Median ms of each candidate, the median per-round speed-up (baseline / candidate) and its confidence."""

    baseline_ms: float
    candidate_ms: float
    speedup: float
    confidence: float  # fraction of rounds on the same side of the threshold as the median
    rounds: int
    rechecked: bool


def _rounds(baseline: Callable[[], object], candidate: Callable[[], object], rounds: int
            ) -> tuple[list[float], list[float]]:
    base_times, cand_times = [], []
    for index in range(rounds):
        pair = ((baseline, base_times), (candidate, cand_times))
        for fn, times in (pair if index % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return base_times, cand_times


def _summarise(base_times: list[float], cand_times: list[float], threshold: float,
               rechecked: bool) -> PairedTiming:
    ratios = [b / max(c, 1e-12) for b, c in zip(base_times, cand_times, strict=True)]
    speedup = statistics.median(ratios)
    wins = speedup >= threshold
    agree = sum((r >= threshold) == wins for r in ratios) / len(ratios)
    return PairedTiming(statistics.median(base_times) * 1e3, statistics.median(cand_times) * 1e3, speedup, agree,
                        len(ratios), rechecked)


def paired_speedup(baseline: Callable[[], object], candidate: Callable[[], object], *, threshold: float,
                   rounds: int = 5, plausible_max: float = float("inf"), min_confidence: float = 0.8,
                   margin: float = 0.15) -> PairedTiming:
    """Time `baseline` against `candidate` and return the speed-up of `candidate`, re-checked when in doubt.

    A re-check (three times the rounds, added to the first ones) happens when the speed-up lies within
    `margin` of `threshold`, when fewer than `min_confidence` of the rounds agree, or when the speed-up
    exceeds `plausible_max` (more than the saved work allows: a sign that load hit the baseline).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    baseline()  # warm-up: first calls allocate, page in weights, start thread pools
    candidate()
    base_times, cand_times = _rounds(baseline, candidate, rounds)
    result = _summarise(base_times, cand_times, threshold, rechecked=False)
    doubtful = (abs(result.speedup / threshold - 1.0) < margin or result.confidence < min_confidence
                or result.speedup > plausible_max)
    if not doubtful:
        return result
    more_base, more_cand = _rounds(baseline, candidate, 3 * rounds)
    return _summarise(base_times + more_base, cand_times + more_cand, threshold, rechecked=True)
