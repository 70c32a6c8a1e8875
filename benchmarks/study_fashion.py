"""Run the Fashion-MNIST Random Search study (benchmarks/study_fashion.toml) as a user does and record its wall
time, machine, date, table and plots in benchmarks/results/study_fashion.{md,json} (+ PNGs).

    python benchmarks/study_fashion.py            # fresh run (deletes the previous benchmark store)
    python benchmarks/study_fashion.py --resume   # finish an interrupted run

Needs `sudo apt-get install dataset-fashion-mnist`. The store and full report go to benchmarks/out/study_fashion/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from study_common import run_and_record

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="keep the store and finish the remaining trials")
    parser.add_argument("--report-only", action="store_true", help="re-render the results of the last run")
    parser.add_argument("--workers", type=int, default=None, help="parallel trials (default: every core)")
    options = parser.parse_args()
    run_and_record(
        "study_fashion",
        study_file=Path(__file__).resolve().parent / "study_fashion.toml",
        title="Fashion-MNIST study: Random Search baseline, LeNet-300-100 parent",
        resume=options.resume,
        workers=options.workers,
        report_only=options.report_only,
    )
