"""Run the search-methods studies (every search method against its random counterpart and Random Search, equal
search budget) and record table, comparison, machine, date and load in benchmarks/results/.

    python benchmarks/study_methods.py default   # MNIST-1D, CNN parent (benchmarks/study_methods_default.toml)
    python benchmarks/study_methods.py fashion   # Fashion-MNIST, LeNet-300-100 (study_methods_fashion.toml)
    python benchmarks/study_methods.py default --resume | --report-only

The store and the full report go to benchmarks/out/study_methods_<which>/ (not committed).
"""

from __future__ import annotations

import sys

from study_common import HERE, main

STUDIES = {
    "default": ("MNIST-1D, 1-D CNN 32/64/64", HERE / "study_methods_default.toml"),
    "fashion": ("Fashion-MNIST, LeNet-300-100", HERE / "study_methods_fashion.toml"),
}

if __name__ == "__main__":
    which = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in STUDIES else None
    if which is None:
        raise SystemExit(f"name the study first: one of {', '.join(STUDIES)}")
    title, study_file = STUDIES[which]
    main(
        f"study_methods_{which}",
        study_file=study_file,
        title=f"Search methods vs random sub-networks at equal search budget ({title})",
        description=__doc__.splitlines()[0],
    )
