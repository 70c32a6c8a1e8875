"""Run the search-methods studies (every search method against its random counterpart and Random Search, equal
search budget) and record table, comparison, machine, date and load in benchmarks/results/.

    python benchmarks/study_methods.py default   # MNIST-1D, CNN parent (benchmarks/study_methods_default.toml)
    python benchmarks/study_methods.py fashion   # Fashion-MNIST, LeNet-300-100 (study_methods_fashion.toml)
    python benchmarks/study_methods.py default --resume | --report-only [--note "..."]
    python benchmarks/study_methods.py summary   # both studies' methods in one table (the README's)

The store and the full report go to benchmarks/out/study_methods_<which>/ (not committed).
"""

from __future__ import annotations

import json
import sys

from study_common import HERE, RESULTS, main

STUDIES = {
    "default": ("MNIST-1D, 1-D CNN 32/64/64", HERE / "study_methods_default.toml"),
    "fashion": ("Fashion-MNIST, LeNet-300-100", HERE / "study_methods_fashion.toml"),
}


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row["vs_random_mean"] is None:
        return f"{100 * row['test_accuracy_mean']:.2f}"
    return (
        f"{100 * row['test_accuracy_mean']:.2f} ({100 * row['vs_random_mean']:+.2f}; "
        f"{row['random_wins']}/{row['random_pairs']})"
    )


def summary() -> None:
    """One table: every searched arm, each study and target sparsity: accuracy, difference to random, wins."""
    documents = {which: json.loads((RESULTS / f"study_methods_{which}.json").read_text()) for which in STUDIES}
    columns = [(which, sparsity) for which in STUDIES for sparsity in documents[which]["config"]["sparsities"]]
    rows: dict[str, dict[tuple[str, float], dict]] = {}
    for which, document in documents.items():
        for row in document["search_methods"]:
            rows.setdefault(f"{row['method']}-{row['space']}", {})[(which, row["sparsity"])] = row
    random = {
        which: {(r["arm"], r["sparsity"]): r for r in document["summary"] if r["arm"].startswith("random-")}
        for which, document in documents.items()
    }
    header = "| arm | " + " | ".join(f"{STUDIES[w][0].split(',')[0]} {s:g}" for w, s in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    spaces = ("node", "weight", "allocation")
    for space in spaces:
        cells = []
        for which, sparsity in columns:
            found = random[which].get((f"random-{space}", sparsity))
            cells.append(f"{100 * found['test_accuracy_mean']:.2f}" if found else "—")
        lines.append(f"| random-{space} | " + " | ".join(cells) + " |")
        for arm in (a for a in rows if a.endswith(f"-{space}")):
            lines.append(f"| {arm} | " + " | ".join(_cell(rows[arm].get(column)) for column in columns) + " |")
    seeds = {len(document["config"]["seeds"]) for document in documents.values()}
    text = "\n".join(lines) + (
        "\n\nTest accuracy %, mean over the seeds finished (the difference to random-<space> in pp and the seed "
        f"pairs won in brackets); {'/'.join(map(str, sorted(seeds)))} seeds. Full tables with search FLOPs and "
        "seconds: study_methods_default.md, "
        "study_methods_fashion.md.\n"
    )
    (RESULTS / "study_methods_summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    which = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in (*STUDIES, "summary") else None
    if which is None:
        raise SystemExit(f"name the study first: one of {', '.join(STUDIES)}, or summary")
    if which == "summary":
        summary()
    else:
        title, study_file = STUDIES[which]
        main(
            f"study_methods_{which}",
            study_file=study_file,
            title=f"Search methods vs random sub-networks at equal search budget ({title})",
            description=__doc__.splitlines()[0],
        )
