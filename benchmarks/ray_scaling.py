"""Wall time of one small study against the number of Ray worker processes (1, 2, 4), each on a fresh local
Ray cluster with that many CPUs, plus the same study in one process without Ray for reference. Also checks
that every worker count stores the same numbers. Writes benchmarks/results/ray_scaling.{json,md} with the
machine, date and load average (the machine may be shared: the load average says how busy it was).

    python benchmarks/ray_scaling.py            # about 10 trials per worker count
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

from study_common import RESULTS, machine

from sparsearch.study.config import parse_study_config
from sparsearch.study.executors import Executor, InlineExecutor, RayExecutor
from sparsearch.study.runner import run_study
from sparsearch.study.store import StudyStore

STUDY = {
    "name": "ray-scaling",
    "dataset": "digits",
    "sparsities": [0.5, 0.9],
    "arms": ["dense", "random-node", "random-weight"],
    "seeds": [0, 1],
    "model": {"widths": [256, 256]},
    "budget": {"epochs": 6, "batch_size": 32},
}


def numbers(path: Path) -> dict[str, tuple[float, float]]:
    with StudyStore(path, create=False) as store:
        return {row["key"]: (row["test_accuracy"], row["val_accuracy"]) for row in store.trial_rows(STUDY["name"])}


def timed(label: str, executor: Executor, folder: Path) -> dict[str, object]:
    path = folder / f"{label}.sqlite"
    load_before = os.getloadavg()
    started, started_at = time.perf_counter(), time.time()
    run = run_study(parse_study_config(STUDY), store_path=path, executor=executor, show_progress=False)
    wall = time.perf_counter() - started
    if run.failed:
        raise RuntimeError(f"{label}: trials failed: {run.failed}")
    with StudyStore(path, create=False) as store:
        trial_seconds = sum(row["wall_seconds"] for row in store.trial_rows(STUDY["name"]))
        first_start = min(attempt["started"] for attempt in store.attempts(STUDY["name"]))
    result = {
        "executor": label,
        "trials": len(run.finished),
        "wall_seconds": round(wall, 2),
        # start-up: loading the study, starting Ray and its first worker process
        "seconds_to_first_trial": round(first_start - started_at, 2),
        "sum_of_trial_seconds": round(trial_seconds, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "numbers": numbers(path),
    }
    print(f"{label}: {wall:.1f} s wall, {trial_seconds:.1f} s in trials, load {load_before[0]:.2f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="Ray worker counts to time (default 1,2,4)")
    arguments = parser.parse_args()
    counts = [int(text) for text in arguments.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as folder:
        runs = [timed("one process, no Ray", InlineExecutor(), Path(folder))]
        runs += [timed(f"Ray, {n} workers", RayExecutor(n), Path(folder)) for n in counts]
    reference = runs[0]["numbers"]
    identical = all(run["numbers"] == reference for run in runs)
    for run in runs:
        del run["numbers"]
    base = next(run for run in runs if run["executor"] == f"Ray, {counts[0]} workers")["wall_seconds"]
    for run in runs:
        run["speed_up_vs_first_ray"] = round(base / run["wall_seconds"], 2)
    result = {
        "benchmark": "ray_scaling",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "note": "local Ray cluster per row (ray.init with num_cpus = workers, start-up included in wall time); "
        "the machine was shared with other jobs: see the load averages",
        "study": STUDY,
        "same_numbers_for_every_worker_count": identical,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Study wall time against Ray worker processes ({result['date']})",
        "",
        f"Machine: {result['machine']}. {result['note']}.",
        f"Study: {len(reference)} trials (MLP {STUDY['model']['widths']} on digits, {STUDY['budget']['epochs']} "
        f"epochs each). Same numbers for every worker count: {'yes' if identical else 'NO'}.",
        "",
        "| Executor | Wall s | of which before the first trial started | Sum of trial s | Speed-up vs first Ray "
        "row | Load avg (1 min) before / after |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {run['executor']} | {run['wall_seconds']:.1f} | {run['seconds_to_first_trial']:.1f} | "
        f"{run['sum_of_trial_seconds']:.1f} | "
        f"{run['speed_up_vs_first_ray']:.2f} | {run['load_average_before'][0]:.2f} / "
        f"{run['load_average_after'][0]:.2f} |"
        for run in runs
    ]
    (RESULTS / "ray_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not identical:
        raise SystemExit("the worker counts stored different numbers")


if __name__ == "__main__":
    main()
