"""Shared by the runtime benchmarks: interleaved median timing, machine description, result writing."""

from __future__ import annotations

import json
import os
import platform
import random
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


def interleaved_times(fns: dict[str, Callable[[], object]], min_rounds: int = 7, max_rounds: int = 40,
                      budget_s: float = 2.0) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) seconds per call; one call of every function per round (in a shuffled order), so load
    drift hits all alike.

    Both are reported: the median is what a user on this (shared) machine saw; the minimum is the steadiest
    estimate of the code's own cost when other jobs steal the cores for part of the run."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    names = list(fns)
    order = random.Random(0)
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        # a fresh order each round: a call right after another finds that one's weights in the cache (or its
        # threads still waking), and a fixed or merely rotated order would always give each candidate the same
        # predecessor, handing that advantage or penalty to the same candidate every time
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
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
