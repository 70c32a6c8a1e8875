"""Numbers of a study report, computed from the results store alone: one row per arm x sparsity (mean and
spread over seeds, convergence against the dense parent, parameters and FLOPs) and the paired comparison of
Random-Search winners against their random counterparts."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsearch.study.store import EpochRow, StudyStore

SPARSITY_DEFINITION = "sparsity = fraction of zero weights among masked (Linear/Conv) weights"
CONVERGENCE_FRACTION = 0.95


@dataclass(frozen=True)
class StudyResults:
    """Everything a report needs, read from a store."""

    name: str
    store_path: Path
    config: dict[str, Any]
    trials: list[dict[str, Any]]
    curves: dict[str, list[EpochRow]]

    @property
    def done(self) -> list[dict[str, Any]]:
        """Finished trials."""
        return [trial for trial in self.trials if trial["status"] == "done"]

    def status_counts(self) -> dict[str, int]:
        """How many trials are in each status."""
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial["status"]] = counts.get(trial["status"], 0) + 1
        return counts


def load_results(store_path: str | Path, study: str | None = None) -> StudyResults:
    """Read a study from a store; ``study`` may be omitted when the store holds exactly one."""
    with StudyStore(store_path, create=False) as store:
        names = store.study_names()
        if study is None:
            if len(names) != 1:
                held = ", ".join(names) if names else "no study"
                raise ValueError(f"store {str(store_path)!r} holds {held}; name the study to report with --study")
            study = names[0]
        config = store.study_config(study)
        return StudyResults(study, Path(store_path), config, store.trial_rows(study), store.epoch_rows(study))


@dataclass(frozen=True)
class ArmSummary:
    """One arm at one sparsity, aggregated over the seeds whose trial is done."""

    arm: str
    sparsity: float
    seeds: int
    test_accuracy_mean: float
    test_accuracy_std: float
    epochs_to_target_mean: float | None
    seeds_reaching_target: int
    params_total: float
    params_nonzero: float
    flops_dense: float
    flops_nonzero: float
    train_flops: float
    weight_sparsity: float
    node_sparsity: float
    wall_seconds: float


@dataclass(frozen=True)
class SearchComparison:
    """Random-Search winner minus its random counterpart (same space, sparsity and seed), in accuracy."""

    space: str
    sparsity: float
    pairs: int
    difference_mean: float
    difference_std: float
    search_wins: int


def _std(values: Sequence[float]) -> float:
    # sample standard deviation over seeds; a single seed has no spread to show
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def dense_accuracy_by_seed(results: StudyResults) -> dict[int, float]:
    """Final test accuracy of the dense parent per seed."""
    return {trial["seed"]: trial["test_accuracy"] for trial in results.done if trial["arm"] == "dense"}


def epochs_to_reach(curve: Sequence[EpochRow], target: float) -> int | None:
    """First epoch (1-based) whose test accuracy reaches ``target``; None if it never does."""
    for row in curve:
        if row.test_accuracy >= target:
            return row.epoch
    return None


def arm_order(results: StudyResults) -> list[str]:
    """Arms in the order the study file lists them (then any others found in the store)."""
    listed = list(results.config.get("arms", []))
    return listed + sorted({t["arm"] for t in results.trials} - set(listed))


def _mean_known(values: Sequence[float | None]) -> float:
    """Mean of the values that are known (SQLite stores an unmeasurable NaN as NULL); NaN if none is."""
    known = [value for value in values if value is not None and not math.isnan(value)]
    return float(np.mean(known)) if known else math.nan


def space_notes(results: StudyResults) -> dict[str, list[str]]:
    """What the search spaces said about the model, per arm (each note once, in first-seen order)."""
    notes: dict[str, list[str]] = {}
    for trial in results.trials:
        for note in json.loads(trial.get("notes_json") or "[]"):
            arm_notes = notes.setdefault(trial["arm"], [])
            if note not in arm_notes:
                arm_notes.append(note)
    return notes


def summarize(results: StudyResults) -> list[ArmSummary]:
    """One row per arm x sparsity over finished trials, dense first, then by sparsity and arm order."""
    dense = dense_accuracy_by_seed(results)
    dense_fallback = float(np.mean(list(dense.values()))) if dense else None
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for trial in results.done:
        groups.setdefault((trial["arm"], trial["sparsity"]), []).append(trial)
    order = {arm: index for index, arm in enumerate(arm_order(results))}
    rows = []
    for (arm, sparsity), trials in sorted(groups.items(), key=lambda item: (item[0][1], order[item[0][0]])):
        reached = []
        for trial in trials:
            reference = dense.get(trial["seed"], dense_fallback)
            if reference is None:
                continue
            epoch = epochs_to_reach(results.curves.get(trial["key"], []), CONVERGENCE_FRACTION * reference)
            if epoch is not None:
                reached.append(epoch)
        accuracies = [t["test_accuracy"] for t in trials]
        rows.append(
            ArmSummary(
                arm=arm,
                sparsity=sparsity,
                seeds=len(trials),
                test_accuracy_mean=float(np.mean(accuracies)),
                test_accuracy_std=_std(accuracies),
                epochs_to_target_mean=float(np.mean(reached)) if reached else None,
                seeds_reaching_target=len(reached),
                node_sparsity=_mean_known([t["node_sparsity"] for t in trials]),
                **{
                    column: float(np.mean([t[column] for t in trials]))
                    for column in (
                        "params_total",
                        "params_nonzero",
                        "flops_dense",
                        "flops_nonzero",
                        "train_flops",
                        "weight_sparsity",
                        "wall_seconds",
                    )
                },
            )
        )
    return rows


def compare_search_with_random(results: StudyResults) -> list[SearchComparison]:
    """Paired differences search-<space> minus random-<space> per sparsity, over seeds where both are done."""
    accuracy = {(t["arm"], t["sparsity"], t["seed"]): t["test_accuracy"] for t in results.done}
    spaces = sorted(
        {arm.removeprefix("search-") for arm, _, _ in accuracy if arm.startswith("search-")}
        & {arm.removeprefix("random-") for arm, _, _ in accuracy if arm.startswith("random-")}
    )
    comparisons = []
    for space in spaces:
        for sparsity in sorted({s for arm, s, _ in accuracy if arm == f"search-{space}"}):
            differences = [
                accuracy[(f"search-{space}", sparsity, seed)] - accuracy[(f"random-{space}", sparsity, seed)]
                for arm, s, seed in accuracy
                if arm == f"search-{space}" and s == sparsity and (f"random-{space}", sparsity, seed) in accuracy
            ]
            if differences:
                comparisons.append(
                    SearchComparison(
                        space=space,
                        sparsity=sparsity,
                        pairs=len(differences),
                        difference_mean=float(np.mean(differences)),
                        difference_std=_std(differences),
                        search_wins=sum(d > 0 for d in differences),
                    )
                )
    return comparisons


# ------------------------------------------------------------------------------------ formatting
def format_count(value: float) -> str:
    """Human-readable large number: 1234 -> 1.23K, 5.6e6 -> 5.60M."""
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:.0f}"


def format_epochs(row: ArmSummary) -> str:
    """Mean epochs to reach the target; the count of seeds that did when not all did; an em dash if none."""
    if row.epochs_to_target_mean is None:
        return "—"
    text = f"{row.epochs_to_target_mean:.1f}"
    if row.seeds_reaching_target < row.seeds:
        text += f" ({row.seeds_reaching_target}/{row.seeds})"
    return text


TABLE_HEADERS = (
    "Arm",
    "Sparsity",
    "Test acc. % (mean ± std)",
    "Seeds",
    "Epochs to 95% of dense",
    "Non-zero params",
    "Non-zero FLOPs/sample",
    "Training FLOPs (incl. search)",
    "Node sparsity",
    "Wall s/trial",
)


def table_cells(rows: Sequence[ArmSummary]) -> list[list[str]]:
    """The summary table as text cells (same columns as TABLE_HEADERS)."""
    return [
        [
            row.arm,
            f"{row.sparsity:g}",
            f"{100 * row.test_accuracy_mean:.2f} ± {100 * row.test_accuracy_std:.2f}",
            str(row.seeds),
            format_epochs(row),
            format_count(row.params_nonzero),
            format_count(row.flops_nonzero),
            format_count(row.train_flops),
            "—" if math.isnan(row.node_sparsity) else f"{row.node_sparsity:.2f}",
            f"{row.wall_seconds:.1f}",
        ]
        for row in rows
    ]


COMPARISON_HEADERS = ("Space", "Sparsity", "Search − random (pp, mean ± std)", "Search better", "Pairs")


def comparison_cells(rows: Sequence[SearchComparison]) -> list[list[str]]:
    """The search-vs-random comparison as text cells (same columns as COMPARISON_HEADERS)."""
    return [
        [
            row.space,
            f"{row.sparsity:g}",
            f"{100 * row.difference_mean:+.2f} ± {100 * row.difference_std:.2f}",
            f"{row.search_wins}/{row.pairs}",
            str(row.pairs),
        ]
        for row in rows
    ]


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def search_info(trial: dict[str, Any]) -> dict[str, Any] | None:
    """The stored Random Search details of a trial (scores, winner), if any."""
    return json.loads(trial["search_json"]) if trial.get("search_json") else None
