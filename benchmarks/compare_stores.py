"""Do two study stores hold the same results? Joins them on the trial key and compares what training produced.

Used to check that a code change leaves a study's numbers as they were: run the study with the old code (e.g. in a
`git worktree` of the old commit, with `PYTHONPATH=<worktree>/src`) and with the new code on the same machine,
then `python benchmarks/compare_stores.py OLD.sqlite NEW.sqlite`. Exit code 1 if any finished trial differs.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

FIELDS = ("test_accuracy", "val_accuracy", "train_flops", "params_nonzero", "flops_nonzero", "weight_sparsity")


def finished(path: str) -> dict[str, tuple]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(f"SELECT key, {', '.join(FIELDS)} FROM trial WHERE status = 'done'")
        return {row[0]: row[1:] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    args = parser.parse_args()
    old, new = finished(args.old), finished(args.new)
    common = sorted(set(old) & set(new))
    differing = [key for key in common if old[key] != new[key]]
    identical = len(common) - len(differing)
    print(f"{len(common)} trials finished in both stores; {identical} identical in {', '.join(FIELDS)}")
    for key in differing:
        print(f"  {key}: old {old[key]} new {new[key]}")
    only = sorted(set(old) ^ set(new))
    if only:
        print(f"{len(only)} trials finished in one store only: {', '.join(only[:5])}{' ...' if len(only) > 5 else ''}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
