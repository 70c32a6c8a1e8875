"""Does evaluating a search's candidates in parallel help? Random Search on the default study's parent, its 8
candidates scored one after another in one process against the same 8 on a pool of forked workers, in one run.

    python benchmarks/search_parallel.py [--workers 2] [--repeats 2]

The default study's cell (MNIST-1D, CNN 32/64/64, weight space at 90%, 8 candidates x 40 short-training
steps); every candidate uses one torch thread. Both orders are timed alternately; the result file records the
load average, because on a shared machine the ratio says as much about the other load as about the pool.
Writes benchmarks/results/search_parallel.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

from sparsearch.data import load_dataset
from sparsearch.models import build_model
from sparsearch.search import SearchProblem, make_space, run_method
from sparsearch.search.methods import ParallelEvaluator

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)

    def parent():
        return build_model("cnn", data.input_shape, data.num_classes, widths=(32, 64, 64), seed=0)

    problem = SearchProblem(make_space("weight", parent(), 0.9), parent, data, seed=0, short_train_steps=40)
    load_before = os.getloadavg()
    timings: dict[str, list[float]] = {"in order": [], "parallel": []}
    outcomes = {}
    with ParallelEvaluator(problem, args.workers) as pool:
        run_method("search", problem, evaluate_many=pool)  # start the workers before timing
        for _ in range(args.repeats):
            for mode in ("in order", "parallel"):
                started = time.perf_counter()
                outcomes[mode] = run_method("search", problem, evaluate_many=pool if mode == "parallel" else None)
                timings[mode].append(time.perf_counter() - started)
    same = outcomes["in order"].evaluations == [
        {**entry, "seconds": outcomes["in order"].evaluations[i]["seconds"]}
        for i, entry in enumerate(outcomes["parallel"].evaluations)
    ]
    best = {mode: min(values) for mode, values in timings.items()}
    document = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "workers": args.workers,
        "seconds": timings,
        "speedup_fastest": best["in order"] / best["parallel"],
        "same_scores_and_winner": same and outcomes["in order"].best_id == outcomes["parallel"].best_id,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_parallel.json").write_text(json.dumps(document, indent=1))
    lines = [
        "# Candidates of one search in parallel (Random Search, 8 candidates x 40 steps, MNIST-1D CNN 32/64/64)",
        "",
        f"{document['date']}, {document['cores']} cores shared with other work (load average "
        f"{load_before[0]:.2f} before, {document['load_average_after'][0]:.2f} after), torch {document['torch']}.",
        "",
        "| evaluation | seconds per search (each repeat) | fastest |",
        "|---|---|---|",
        *(
            f"| {mode} | {', '.join(f'{v:.1f}' for v in values)} | {best[mode]:.1f} |"
            for mode, values in timings.items()
        ),
        "",
        f"Speed-up of {args.workers} workers (fastest against fastest): {document['speedup_fastest']:.2f}x; "
        f"same scores and winner: {document['same_scores_and_winner']}.",
    ]
    (RESULTS / "search_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
