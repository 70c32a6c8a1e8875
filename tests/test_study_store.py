"""The SQLite results store: registering studies, refusing a different study under the same name without
changing anything, atomic trial completion, and claims: each pending trial handed out once, only its owner
writes it, and a claim whose owner died or fell silent goes back to pending."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from sparsearch.study import store as store_module
from sparsearch.study.store import EpochRow, StudyStore, TrialOutcome, TrialSpec, owner_id

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


def test_claims_hand_out_each_pending_trial_once_and_stale_claims_come_back(tmp_path):
    path = tmp_path / "s.sqlite"
    with StudyStore(path, owner="hostA:1:1") as a, StudyStore(path, owner="hostB:2:2", claim_timeout=0.5) as b:
        a.register_study("a", {}, "h", TRIALS)
        a.finish_trial("a", TRIALS[0].key, outcome(0.8))
        assert a.claim_next("a") == TRIALS[1]
        assert b.claim_next("a") == TRIALS[2]
        assert a.claim_next("a") is None and b.claim_next("a") is None  # done and claimed trials are not handed out
        a.add_epoch("a", TRIALS[1].key, EpochRow(1, 10, 2.0, 0.1, 0.1, 0.2))
        # b may not write a's trial: its epochs, its result
        b.add_epoch("a", TRIALS[1].key, EpochRow(2, 20, 9.0, 0.9, 0.9, 0.2))
        assert not b.finish_trial("a", TRIALS[1].key, outcome(0.1))
        assert [row.epoch for row in a.epoch_rows("a")[TRIALS[1].key]] == [1]
        assert b.running_elsewhere("a") == {TRIALS[1].key: "hostA:1:1"}
        time.sleep(0.7)
        # a (on another host, so judged by its heartbeat) has been silent past b's timeout: b takes the trial over,
        # from scratch
        assert b.claim_next("a") == TRIALS[1]
        assert TRIALS[1].key not in a.epoch_rows("a")
        assert not a.finish_trial("a", TRIALS[1].key, outcome(0.1))  # a late result of the old owner is refused
        assert b.finish_trial("a", TRIALS[1].key, outcome(0.7))
        b.fail_trial("a", TRIALS[2].key, "boom")
        assert a.retry_failed("a") == 1
        assert a.claim_next("a") == TRIALS[2]
        assert a.release_own_claims("a") == 1
        rows = {row["key"]: row for row in a.trial_rows("a")}
        attempts = [(row["trial_key"], row["owner"], row["outcome"]) for row in a.attempts("a")]
    assert rows[TRIALS[1].key]["test_accuracy"] == 0.7 and rows[TRIALS[2].key]["status"] == "pending"
    assert attempts == [
        (TRIALS[1].key, "hostA:1:1", "expired"),
        (TRIALS[2].key, "hostB:2:2", "failed"),
        (TRIALS[1].key, "hostB:2:2", "done"),
        (TRIALS[2].key, "hostA:1:1", "released"),
    ]


def test_a_live_heartbeat_keeps_a_claim_and_a_dead_process_on_this_host_loses_it_at_once(tmp_path):
    path = tmp_path / "s.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{socket.gethostname()}:{int(dead.stdout)}:1"  # this host, a process that has exited
    with (
        StudyStore(path, owner="elsewhere:7:7", claim_timeout=0.6) as live,
        StudyStore(path, owner=dead_owner) as gone,
        StudyStore(path, claim_timeout=0.6) as me,
    ):
        me.register_study("a", {}, "h", TRIALS)
        assert live.claim_next("a") == TRIALS[0] and gone.claim_next("a") == TRIALS[1]
        with live.heartbeat(interval=0.1):
            time.sleep(1.0)
            # the dead process's claim is released at once; the live one's heartbeat keeps its claim
            assert me.claim_next("a") == TRIALS[1]
            assert me.claim_next("a") == TRIALS[2]
            assert me.claim_next("a") is None
        assert me.running_elsewhere("a") == {TRIALS[0].key: "elsewhere:7:7"}
        with pytest.raises(ValueError, match="claim_timeout must be above 0"):
            StudyStore(path, claim_timeout=0)
    # this process's own id names a live process on this host
    assert owner_id().startswith(f"{socket.gethostname()}:{os.getpid()}:")


def test_claim_timeout_from_the_environment_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEARCH_CLAIM_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SPARSEARCH_CLAIM_TIMEOUT must be a number of seconds above 0, got 'soon'"):
        StudyStore(tmp_path / "s.sqlite")
    monkeypatch.setenv("SPARSEARCH_CLAIM_TIMEOUT", "2.5")
    with StudyStore(tmp_path / "s.sqlite") as store:
        assert store.claim_timeout == 2.5


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



def test_a_store_brought_up_to_date_by_another_process_meanwhile_is_not_altered_twice(tmp_path):
    """Two study processes started together on a store written by an older sparsearch both find columns missing;
    the one that adds them second must see that the other did (one once failed with 'duplicate column name')."""
    path = tmp_path / "old.sqlite"
    other = sqlite3.connect(path, isolation_level=None, timeout=30)
    other.execute("PRAGMA journal_mode = WAL")
    other.executescript(store_module._SCHEMA)  # this version's tables, the trial table without the added columns
    other.execute("BEGIN IMMEDIATE")
    other.execute("ALTER TABLE trial ADD COLUMN owner TEXT")  # the other process, halfway through adding them
    outcome_of_open: dict[str, object] = {}

    def open_store() -> None:
        try:
            StudyStore(path).close()
            outcome_of_open["ok"] = True
        except Exception as error:  # reported by the assertion below
            outcome_of_open["error"] = error

    opener = threading.Thread(target=open_store)
    opener.start()
    time.sleep(1.0)  # the opener has read the columns (or waits for the lock) while the other's change is pending
    other.execute("COMMIT")
    opener.join(timeout=60)
    other.close()
    assert outcome_of_open == {"ok": True}, outcome_of_open
    with StudyStore(path) as store:
        columns = {row["name"] for row in store.connection.execute("PRAGMA table_info(trial)")}
    assert {"notes_json", "owner", "heartbeat"} <= columns
