"""Run the Fashion-MNIST Random Search study (benchmarks/study_fashion.toml) as a user does and record its wall
time, machine, date, table and plots in benchmarks/results/study_fashion.{md,json} (+ PNGs).

    python benchmarks/study_fashion.py            # fresh run (deletes the previous benchmark store)
    python benchmarks/study_fashion.py --resume   # finish an interrupted run

Needs `sudo apt-get install dataset-fashion-mnist`. The store and full report go to benchmarks/out/study_fashion/.
"""

from __future__ import annotations

from pathlib import Path

from study_common import main

if __name__ == "__main__":
    main(
        "study_fashion",
        study_file=Path(__file__).resolve().parent / "study_fashion.toml",
        title="Fashion-MNIST study: Random Search baseline, LeNet-300-100 parent",
        description=__doc__.splitlines()[0],
    )
