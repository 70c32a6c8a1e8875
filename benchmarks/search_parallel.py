"""Does evaluating a study's candidates in parallel help where trials leave cores free? One slice of the default
study (one search arm, one cell, 8 candidates) run as a study with `[search] workers = 1` against `workers = 2`,
in one run, alternately.

    python benchmarks/search_parallel.py [--workers 2] [--repeats 2] [--epochs 2]

The slice: MNIST-1D, CNN 32/64/64, arm `search-weight` at 90% sparsity, seed 0, Random Search's 8 candidates x
40 short-training steps (the default study's search), the winner trained for `--epochs` epochs. One trial in
flight (the inline executor, as a one-arm study or the last trial of a study runs), one torch thread per
process. Each run gets a fresh store; the stored results of every run are compared (all but times). The result
file records machine, date and load average before and after.
Writes benchmarks/results/search_parallel.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from runtime_common import machine, write_results

from sparsearch.study import run_study
from sparsearch.study.executors import InlineExecutor
from sparsearch.study.store import StudyStore

ARM = "search-weight"


def study(search_workers: int, epochs: int) -> dict:
    return {
        "name": "search-parallel-slice",
        "dataset": "mnist1d",
        "model": {"arch": "cnn", "widths": [32, 64, 64]},
        "sparsities": [0.9],
        "seeds": [0],
        "arms": [ARM],
        "budget": {"epochs": epochs, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "lr_schedule": "cosine"},
        "search": {"n_candidates": 8, "scorer": "short-train", "short_train_steps": 40, "workers": search_workers},
    }


def run_slice(search_workers: int, epochs: int, folder: Path) -> dict:
    """Run the slice as a study on a fresh store; its wall time and what the store holds."""
    store = folder / f"{time.monotonic_ns()}.sqlite"
    started = time.perf_counter()
    run = run_study(study(search_workers, epochs), store_path=store, executor=InlineExecutor(), show_progress=False)
    wall = time.perf_counter() - started
    if run.failed:
        raise RuntimeError(f"the slice failed: {run.failed}")
    with StudyStore(store, create=False) as opened:
        (row,) = opened.trial_rows("search-parallel-slice")
    search = json.loads(row["search_json"])
    stored = {
        "test_accuracy": row["test_accuracy"],
        "train_flops": row["train_flops"],
        "best_id": search["best_id"],
        "search_flops": search["flops"],
        "scores": [(entry["score"], entry["loss"], entry["flops"]) for entry in search["evaluations"]],
    }
    return {
        "wall_seconds": wall,
        "search_seconds": search["seconds"],
        "train_seconds": row["train_seconds"],
        "workers_used": search["workers"],
        "stored": stored,
    }


def timings(run: dict) -> dict:
    return {key: value for key, value in run.items() if key != "stored"}


def each(runs: list[dict], key: str) -> str:
    return ", ".join(f"{run[key]:.1f}" for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    settings = {"in order (workers = 1)": 1, f"parallel (workers = {args.workers})": args.workers}
    runs: dict[str, list[dict]] = {label: [] for label in settings}
    with tempfile.TemporaryDirectory() as folder:
        run_slice(1, 1, Path(folder))  # load the data set and warm the caches before timing
        for _ in range(args.repeats):
            for label, workers in settings.items():
                runs[label].append(run_slice(workers, args.epochs, Path(folder)))
                print(label, timings(runs[label][-1]), flush=True)
    reference = next(iter(runs.values()))[0]["stored"]
    identical = all(run["stored"] == reference for values in runs.values() for run in values)
    fastest = {label: min(run["wall_seconds"] for run in values) for label, values in runs.items()}
    search_fastest = {label: min(run["search_seconds"] for run in values) for label, values in runs.items()}
    serial, parallel = settings
    payload = {
        "machine": info,
        "slice": study(args.workers, args.epochs),  # run with search workers 1 and args.workers
        "runs": {label: [timings(run) for run in values] for label, values in runs.items()},
        "speedup_study_fastest": fastest[serial] / fastest[parallel],
        "speedup_search_fastest": search_fastest[serial] / search_fastest[parallel],
        "identical_stored_results": identical,
        "stored": reference,
    }
    lines = [
        f"# Candidates of a study's search in parallel: `[search] workers` 1 against {args.workers}",
        "",
        f"One slice of the default study run as a study: `{ARM}` at 90%, seed 0, MNIST-1D CNN 32/64/64, 8 "
        f"candidates x 40 short-training steps, winner trained {args.epochs} epochs; one trial in flight (inline "
        "executor), one torch thread per process, fresh store per run, settings alternated. "
        "`python benchmarks/search_parallel.py`.",
        "",
        "| search workers | study wall s (each run) | search s (each run) | winner training s | fastest study s |",
        "|---|---|---|---|---|",
    ]
    for label, values in runs.items():
        lines.append(
            f"| {label} | {each(values, 'wall_seconds')} | {each(values, 'search_seconds')} | "
            f"{statistics.median(run['train_seconds'] for run in values):.1f} | {fastest[label]:.1f} |"
        )
    lines += [
        "",
        f"Speed-up (fastest against fastest): study {payload['speedup_study_fastest']:.2f}x, search alone "
        f"{payload['speedup_search_fastest']:.2f}x. Stored results identical in every run (test accuracy, "
        f"training FLOPs, every candidate's score, loss and FLOPs, the winner): {identical}.",
        "",
        "Where a study's trial workers already fill the cores, extra candidate processes only share the same "
        "cores: `workers = \"auto\"` then gives 1.",
    ]
    write_results("search_parallel", payload, "\n".join(lines[2:]) + "\n")
    # the title goes above the machine line that write_results puts first
    markdown = Path(__file__).resolve().parent / "results" / "search_parallel.md"
    markdown.write_text("\n".join(lines[:2]) + markdown.read_text())
    print(markdown.read_text())


if __name__ == "__main__":
    main()
