"""Run the default study exactly as a user does (`sparsearch study`, no study file) and record its wall time,
machine, date, table and plots in benchmarks/results/study_default.{md,json} (+ PNGs).

    python benchmarks/study_default.py            # fresh run (deletes the previous benchmark store)
    python benchmarks/study_default.py --resume   # finish an interrupted run

The store and the full report go to benchmarks/out/study_default/ (not committed).
"""

from __future__ import annotations

import argparse

from study_common import run_and_record

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="keep the store and finish the remaining trials")
    parser.add_argument("--report-only", action="store_true", help="re-render the results of the last run")
    parser.add_argument("--workers", type=int, default=None, help="parallel trials (default: every core)")
    options = parser.parse_args()
    run_and_record(
        "study_default",
        study_file=None,
        title="Default study: Random Search baseline on MNIST-1D (`sparsearch study`)",
        resume=options.resume,
        workers=options.workers,
        report_only=options.report_only,
    )
