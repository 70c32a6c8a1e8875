"""Reports from a store alone: the numbers in the table (mean ± std over seeds, epochs to 95% of dense), the
search-vs-random comparison, and every output file (PNG, self-contained HTML, CSV, JSON, markdown)."""

from __future__ import annotations

import csv
import json

import pytest

from sparsearch.report import compare_search_with_random, load_results, summarize, write_report
from sparsearch.study.store import EpochRow, StudyStore, TrialOutcome, TrialSpec

# final test accuracy per (arm, seed); curves rise linearly to it over 4 epochs
FINAL = {
    ("dense", 0): 0.80,
    ("dense", 1): 0.90,
    ("random-node", 0): 0.70,
    ("random-node", 1): 0.80,
    ("search-node", 0): 0.76,
    ("search-node", 1): 0.84,
}
EPOCHS = 4


def curve(final: float) -> tuple[EpochRow, ...]:
    return tuple(EpochRow(e, 5 * e, 1.0 / e, final * e / EPOCHS, final * e / EPOCHS, 0.1) for e in range(1, EPOCHS + 1))


def make_store(path, *, finish_all: bool = True):
    config = {"name": "syn", "dataset": "digits", "arms": ["dense", "random-node", "search-node"], "sparsities": [0.9]}
    with StudyStore(path) as store:
        specs = [TrialSpec(arm, 0.0 if arm == "dense" else 0.9, seed) for arm, seed in FINAL]
        store.register_study("syn", config, "h", specs)
        for spec in specs:
            if not finish_all and spec.arm == "search-node" and spec.seed == 1:
                continue
            nonzero = 1000 if spec.arm == "dense" else 100
            store.finish_trial(
                "syn",
                spec.key,
                TrialOutcome(
                    test_accuracy=FINAL[(spec.arm, spec.seed)],
                    val_accuracy=FINAL[(spec.arm, spec.seed)],
                    params_total=1000,
                    params_nonzero=nonzero,
                    flops_dense=2000,
                    flops_nonzero=2 * nonzero,
                    train_flops=6 * nonzero,
                    weight_sparsity=0.0 if spec.arm == "dense" else 0.9,
                    node_sparsity=0.0 if spec.arm == "dense" else 0.68,
                    train_seconds=1.0,
                    wall_seconds=2.0,
                    epochs=curve(FINAL[(spec.arm, spec.seed)]),
                    search={"scores": [0.3, 0.5], "best_index": 1} if spec.arm == "search-node" else None,
                ),
            )
    return path


def test_summary_numbers(tmp_path):
    results = load_results(make_store(tmp_path / "s.sqlite"))
    rows = {(row.arm, row.sparsity): row for row in summarize(results)}
    assert list(rows) == [("dense", 0.0), ("random-node", 0.9), ("search-node", 0.9)]
    random_row = rows[("random-node", 0.9)]
    assert random_row.test_accuracy_mean == pytest.approx(0.75)
    assert random_row.test_accuracy_std == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.7, 0.8
    assert random_row.params_nonzero == 100 and random_row.flops_nonzero == 200
    # 95% of dense per seed: seed 0 -> 0.76, seed 1 -> 0.855. random-node peaks at 0.70 / 0.80: never.
    assert random_row.epochs_to_target_mean is None
    # search-node seed 0 reaches 0.76 at epoch 4; seed 1 peaks at 0.84 < 0.855: one of two seeds
    search_row = rows[("search-node", 0.9)]
    assert search_row.epochs_to_target_mean == 4.0 and search_row.seeds_reaching_target == 1
    # dense reaches 95% of itself at epoch 4 (0.75 * final < 0.95 * final at epoch 3)
    assert rows[("dense", 0.0)].epochs_to_target_mean == 4.0
    (comparison,) = compare_search_with_random(results)
    assert comparison.space == "node" and comparison.pairs == 2 and comparison.search_wins == 2
    assert comparison.difference_mean == pytest.approx(0.05)


def test_write_report_files(tmp_path):
    store = make_store(tmp_path / "runs" / "s.sqlite")
    report = write_report(store)
    files = report.files
    assert files.folder == tmp_path / "runs" / "syn-report"
    for png in (files.accuracy_plot, files.convergence_plot):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 2 and "<img" in page and 'src="http' not in page
    assert "sparsity = fraction of zero weights among masked (Linear/Conv) weights" in page
    assert "75.00 ± 7.07" in page
    with files.csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["arm"] for row in rows] == ["dense", "random-node", "search-node"]
    assert float(rows[1]["test_accuracy_mean"]) == pytest.approx(0.75)
    document = json.loads(files.json.read_text())
    assert document["study"] == "syn"
    assert len(document["trials"]) == 6 and len(document["curves"]) == 6
    assert document["summary"][1]["epochs_to_target_mean"] is None
    assert document["trials"][4]["search"]["best_index"] == 1
    assert "| random-node | 0.9 | 75.00 ± 7.07 | 2 | — |" in files.markdown.read_text()


def test_report_of_a_partial_study_uses_finished_trials_only(tmp_path):
    report = write_report(make_store(tmp_path / "s.sqlite", finish_all=False), folder=tmp_path / "out")
    search_row = next(row for row in report.rows if row.arm == "search-node")
    assert search_row.seeds == 1
    assert "1 pending" in report.files.html.read_text()


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "absent.sqlite")
    empty = tmp_path / "empty.sqlite"
    with StudyStore(empty) as store:
        store.register_study("e", {}, "h", [TrialSpec("dense", 0.0, 0)])
        store.register_study("f", {}, "h", [TrialSpec("dense", 0.0, 0)])
    with pytest.raises(ValueError, match="holds e, f; name the study"):
        write_report(empty)
    with pytest.raises(ValueError, match="has no finished trial yet"):
        write_report(empty, "e")
