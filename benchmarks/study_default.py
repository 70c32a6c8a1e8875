"""Run the default study exactly as a user does (`sparsearch study`, no study file) and record its wall time,
machine, date, table and plots in benchmarks/results/study_default.{md,json} (+ PNGs).

    python benchmarks/study_default.py            # fresh run (deletes the previous benchmark store)
    python benchmarks/study_default.py --resume   # finish an interrupted run

The store and the full report go to benchmarks/out/study_default/ (not committed).
"""

from __future__ import annotations

from study_common import main

if __name__ == "__main__":
    main(
        "study_default",
        study_file=None,
        title="Default study: Random Search baseline on MNIST-1D (`sparsearch study`)",
        description=__doc__.splitlines()[0],
    )
