"""Search methods side by side: per space and sparsity, each ``<method>-<space>`` arm against its random
counterpart (``random-<space>``) and against Random Search (``search-<space>``), paired by seed, with the share
of seed pairs won and what the search cost (FLOPs against the budget, seconds)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sparsearch.report.summary import StudyResults, format_count, search_info


@dataclass(frozen=True)
class MethodComparison:
    """One searched arm at one sparsity: accuracy, paired differences (pp) and search cost, over seeds."""

    method: str
    space: str
    sparsity: float
    seeds: int
    test_accuracy_mean: float
    vs_random_mean: float | None
    vs_random_std: float | None
    random_wins: int
    random_pairs: int
    vs_search_mean: float | None
    vs_search_std: float | None
    search_wins: int
    search_pairs: int
    search_flops: float
    budget_flops: float
    search_seconds: float


def _method_and_space(trial: dict) -> tuple[str, str] | None:
    """(method, space) of a searched trial, from the method its stored search record names (Random Search
    records written before methods existed name none: their arm is ``search-<space>``)."""
    info = search_info(trial)
    if info is None:
        return None
    method = info.get("method", "search")
    prefix = f"{method}-"
    if not trial["arm"].startswith(prefix) or len(trial["arm"]) == len(prefix):
        return None
    return method, trial["arm"][len(prefix) :]


def _paired(
    accuracy: dict[tuple[str, float, int], float], arm: str, other: str, sparsity: float
) -> tuple[float | None, float | None, int, int]:
    differences = [
        value - accuracy[(other, sparsity, seed)]
        for (name, s, seed), value in accuracy.items()
        if name == arm and s == sparsity and (other, sparsity, seed) in accuracy
    ]
    if not differences:
        return None, None, 0, 0
    spread = float(np.std(differences, ddof=1)) if len(differences) > 1 else 0.0
    return float(np.mean(differences)), spread, sum(d > 0 for d in differences), len(differences)


def compare_methods(results: StudyResults) -> list[MethodComparison]:
    """Every searched arm per sparsity, grouped by space, in the study's arm order."""
    done = [trial for trial in results.done if trial["arm"] != "dense"]
    accuracy = {(t["arm"], t["sparsity"], t["seed"]): t["test_accuracy"] for t in done}
    parsed = {t["arm"]: found for t in done if (found := _method_and_space(t)) is not None}
    listed = list(results.config.get("arms", []))
    arms = [arm for arm in listed if arm in parsed] + sorted(set(parsed) - set(listed))
    spaces = list(dict.fromkeys(parsed[arm][1] for arm in arms))
    rows = []
    for sparsity in sorted({t["sparsity"] for t in done}):
        for space in spaces:
            for arm in (a for a in arms if parsed[a][1] == space):
                method = parsed[arm][0]
                trials = [t for t in done if t["arm"] == arm and t["sparsity"] == sparsity]
                if not trials:
                    continue
                searches = [info for info in (search_info(t) for t in trials) if info]
                vs_random = _paired(accuracy, arm, f"random-{space}", sparsity)
                no_pairs: tuple[float | None, float | None, int, int] = (None, None, 0, 0)
                vs_search = _paired(accuracy, arm, f"search-{space}", sparsity) if method != "search" else no_pairs
                rows.append(
                    MethodComparison(
                        method=method,
                        space=space,
                        sparsity=sparsity,
                        seeds=len(trials),
                        test_accuracy_mean=float(np.mean([t["test_accuracy"] for t in trials])),
                        vs_random_mean=vs_random[0],
                        vs_random_std=vs_random[1],
                        random_wins=vs_random[2],
                        random_pairs=vs_random[3],
                        vs_search_mean=vs_search[0],
                        vs_search_std=vs_search[1],
                        search_wins=vs_search[2],
                        search_pairs=vs_search[3],
                        search_flops=float(np.mean([s.get("flops", 0) for s in searches])),
                        budget_flops=float(np.mean([s.get("budget_flops", s.get("flops", 0)) for s in searches])),
                        search_seconds=float(np.mean([s.get("seconds", 0.0) for s in searches])),
                    )
                )
    return rows


METHOD_HEADERS = (
    "Space",
    "Sparsity",
    "Method",
    "Test acc. %",
    "− random (pp)",
    "Won vs random",
    "− Random Search (pp)",
    "Won vs RS",
    "Search FLOPs (of budget)",
    "Search s",
)


def _difference(mean: float | None, spread: float | None) -> str:
    return "—" if mean is None or spread is None else f"{100 * mean:+.2f} ± {100 * spread:.2f}"


def method_cells(rows: Sequence[MethodComparison]) -> list[list[str]]:
    """The side-by-side comparison as text cells (same columns as METHOD_HEADERS)."""
    return [
        [
            row.space,
            f"{row.sparsity:g}",
            row.method,
            f"{100 * row.test_accuracy_mean:.2f}",
            _difference(row.vs_random_mean, row.vs_random_std),
            f"{row.random_wins}/{row.random_pairs}" if row.random_pairs else "—",
            _difference(row.vs_search_mean, row.vs_search_std),
            f"{row.search_wins}/{row.search_pairs}" if row.search_pairs else "—",
            f"{format_count(row.search_flops)} ({row.search_flops / row.budget_flops:.2f})"
            if row.budget_flops
            else format_count(row.search_flops),
            f"{row.search_seconds:.1f}",
        ]
        for row in rows
    ]
