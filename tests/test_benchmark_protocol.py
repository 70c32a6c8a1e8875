"""The benchmarks' timing protocol: candidates called in balanced cycles (benchmarks/runtime_common.py)."""

import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from runtime_common import balanced_order, interleaved_times


@pytest.mark.parametrize("count", [2, 3, 4, 7])
def test_every_candidate_follows_every_other_equally_often(count):
    names = [f"c{i}" for i in range(count)]
    cycle = balanced_order(names)
    assert Counter(cycle) == dict.fromkeys(names, count - 1)
    sequence = cycle * 3 + cycle[:1]  # three cycles chained, closed
    pairs = Counter(pairwise(sequence))
    assert set(pairs) == {(a, b) for a in names for b in names if a != b}  # never itself, every other
    assert set(pairs.values()) == {3}


def test_interleaved_times_calls_in_whole_cycles():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians, minima = interleaved_times(fns, min_rounds=4, max_rounds=4, budget_s=0.0)
    assert set(medians) == set(minima) == set("abc")
    timed = calls[3:]  # after one warm-up call each
    assert Counter(timed) == dict.fromkeys("abc", 4) and len(timed) == 2 * len(balanced_order(list("abc")))
