"""Shared by the runtime benchmarks: interleaved median timing, machine description, result writing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "system": f"{platform.system()} {platform.release()}", "torch": torch.__version__,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def balanced_order(names: list[str]) -> list[str]:
    """One cycle of calls in which every candidate directly follows every other exactly once (an Eulerian circuit of
    the complete directed graph on the candidates, its closing return left out so that cycles chain seamlessly).

    Why: a call right after another finds that one's weights in the cache (or its threads still waking, or the caches
    flushed by a large dense model). A random order per round from a fixed seed repeats the same imbalance at every
    point of a benchmark: with three candidates and 40 rounds, one came right after a second 22 times and the second
    after the first 16 times, and two runs of identical kernels read 3-9% apart. Here each ordered pair occurs once
    per cycle, so no candidate gets a better predecessor than another."""
    if len(names) < 2:
        return list(names)
    edges = {a: [b for b in names if b != a] for a in names}
    stack, circuit = [names[0]], []
    while stack:  # Hierholzer's algorithm
        vertex = stack[-1]
        if edges[vertex]:
            stack.append(edges[vertex].pop())
        else:
            circuit.append(stack.pop())
    circuit.reverse()
    return circuit[:-1]  # ends where it started: the next cycle's first call follows the last


def interleaved_times(fns: dict[str, Callable[[], object]], min_rounds: int = 7, max_rounds: int = 40,
                      budget_s: float = 2.0) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) seconds per call; the candidates are called in whole cycles of `balanced_order` (each
    candidate n - 1 times per cycle, each time after a different one), so load drift and cache effects hit all
    alike; `min_rounds` / `max_rounds` count calls per candidate.

    Both are reported: the median is what a user on this (shared) machine saw; the minimum is the steadiest
    estimate of the code's own cost when other jobs steal the cores for part of the run."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cycle = balanced_order(list(fns))
    start = time.perf_counter()
    calls = 0
    while calls < min_rounds or (calls < max_rounds and time.perf_counter() - start < budget_s):
        for name in cycle:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        calls = min(len(values) for values in times.values())
    return ({name: statistics.median(values) for name, values in times.items()},
            {name: min(values) for name, values in times.items()})


def write_results(name: str, payload: dict, markdown: str) -> None:
    """Write payload as json and markdown; the load average at the end is recorded unless already there (a
    re-render of an earlier run keeps that run's)."""
    RESULTS.mkdir(exist_ok=True)
    payload["machine"].setdefault("load_average_at_end", [round(v, 2) for v in os.getloadavg()])
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    m = payload["machine"]
    header = (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
              f"{m['system']}. Date: {m['date']}. Load average at start {m['load_average_at_start']}, "
              f"at end {m['load_average_at_end']} (ratios are from the same run, interleaved; 'median' and 'best' = "
              "ratio of median and of fastest times).\n\n")
    (RESULTS / f"{name}.md").write_text(header + markdown)
