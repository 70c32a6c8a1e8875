"""The SQLite results store: registering studies, refusing a different study under the same name without
changing anything, atomic trial completion, and resetting interrupted trials."""

from __future__ import annotations

import sqlite3

import pytest

from sparsearch.study.store import EpochRow, StudyStore, TrialOutcome, TrialSpec

TRIALS = [TrialSpec("dense", 0.0, 0), TrialSpec("random-node", 0.9, 0), TrialSpec("search-node", 0.9, 0)]


def outcome(accuracy: float, epochs: int = 3) -> TrialOutcome:
    return TrialOutcome(
        test_accuracy=accuracy,
        val_accuracy=accuracy,
        params_total=100,
        params_nonzero=10,
        flops_dense=200,
        flops_nonzero=20,
        train_flops=6000,
        weight_sparsity=0.9,
        node_sparsity=0.5,
        train_seconds=1.0,
        wall_seconds=1.5,
        epochs=tuple(
            EpochRow(e, 10 * e, 1.0 / e, accuracy * e / epochs, accuracy * e / epochs, 0.3)
            for e in range(1, epochs + 1)
        ),
        search={"scores": [0.1, 0.2], "best_index": 1},
    )


def dump(path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return list(connection.iterdump())


def test_register_is_idempotent_and_refuses_a_different_study(tmp_path):
    path = tmp_path / "s.sqlite"
    with StudyStore(path) as store:
        assert store.register_study("a", {"x": 1}, "hash1", TRIALS) == 3
        assert store.register_study("a", {"x": 1}, "hash1", TRIALS) == 0
        store.finish_trial("a", TRIALS[0].key, outcome(0.8))
    before = dump(path)
    with StudyStore(path) as store, pytest.raises(ValueError) as raised:
        store.register_study("a", {"x": 2}, "hash2", TRIALS[:1])
    message = str(raised.value)
    assert "already holds a different study named 'a'" in message
    assert "--store" in message and str(path) in message
    assert dump(path) == before


def test_finished_trial_keeps_its_whole_curve(tmp_path):
    with StudyStore(tmp_path / "s.sqlite") as store:
        store.register_study("a", {}, "h", TRIALS)
        store.mark_running("a", TRIALS[1].key, 1.0)
        store.add_epoch("a", TRIALS[1].key, EpochRow(1, 10, 2.0, 0.1, 0.1, 0.2))
        store.finish_trial("a", TRIALS[1].key, outcome(0.7, epochs=4))
        rows = {row["key"]: row for row in store.trial_rows("a")}
        curve = store.epoch_rows("a")[TRIALS[1].key]
    assert rows[TRIALS[1].key]["status"] == "done"
    assert rows[TRIALS[1].key]["test_accuracy"] == 0.7
    assert [row.epoch for row in curve] == [1, 2, 3, 4]
    assert curve[-1].test_accuracy == pytest.approx(0.7)


def test_reset_unfinished_drops_partial_curves_and_keeps_done_trials(tmp_path):
    with StudyStore(tmp_path / "s.sqlite") as store:
        store.register_study("a", {}, "h", TRIALS)
        store.finish_trial("a", TRIALS[0].key, outcome(0.8))
        store.mark_running("a", TRIALS[1].key, 1.0)
        store.add_epoch("a", TRIALS[1].key, EpochRow(1, 10, 2.0, 0.1, 0.1, 0.2))
        store.fail_trial("a", TRIALS[2].key, "boom")
        finished_before = store.trial_rows("a")[0]["finished"]
        assert store.reset_unfinished("a") == 2
        assert store.trials_with_status("a", "pending") == TRIALS[1:]
        assert [t.key for t in store.trials_with_status("a", "done")] == [TRIALS[0].key]
        assert list(store.epoch_rows("a")) == [TRIALS[0].key]
        assert store.trial_rows("a")[0]["finished"] == finished_before


def test_reading_a_missing_or_foreign_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StudyStore(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()
    foreign = tmp_path / "notes.sqlite"
    foreign.write_text("this is not a database, " * 100)
    with pytest.raises(ValueError, match="not a sparsearch results store"):
        StudyStore(foreign, create=False)
    with StudyStore(tmp_path / "s.sqlite") as store, pytest.raises(ValueError, match="no study named 'b'"):
        store.study_config("b")
