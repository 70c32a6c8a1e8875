"""Two real `sparsearch study` processes on one store share its trials: each trial runs exactly once between
them (counted in the store's attempt log), the numbers equal a single-process run, and when one of them is
killed with -9 in the middle of a trial the other takes that trial over and finishes the study."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsearch.study.config import parse_study_config
from sparsearch.study.executors import InlineExecutor
from sparsearch.study.runner import run_study
from sparsearch.study.store import StudyStore

STUDY_TOML = """name = "shared"
dataset = "digits"
sparsities = [0.5, 0.9]
arms = ["dense", "random-node", "random-weight"]
seeds = [0]
[model]
widths = [48, 48]
[budget]
epochs = 6
batch_size = 32
"""
STUDY = {
    "name": "shared",
    "dataset": "digits",
    "sparsities": [0.5, 0.9],
    "arms": ["dense", "random-node", "random-weight"],
    "seeds": [0],
    "model": {"widths": [48, 48]},
    "budget": {"epochs": 6, "batch_size": 32},
}
TRIAL_COUNT = 5
# who ran a trial and when differ between runs; everything else must not
VOLATILE = {"started", "finished", "train_seconds", "wall_seconds", "search_json", "owner", "heartbeat"}


def stable_numbers(path: Path):
    with StudyStore(path, create=False) as store:
        trials = {row["key"]: {k: v for k, v in row.items() if k not in VOLATILE} for row in store.trial_rows("shared")}
        curves = {
            key: [(r.epoch, r.step, r.train_loss, r.val_accuracy, r.test_accuracy) for r in rows]
            for key, rows in store.epoch_rows("shared").items()
        }
    return trials, curves


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple:
    path = tmp_path_factory.mktemp("single") / "single.sqlite"
    run = run_study(parse_study_config(STUDY), store_path=path, executor=InlineExecutor(), show_progress=False)
    assert len(run.finished) == TRIAL_COUNT
    return stable_numbers(path)


def start_study(study_file: Path, store: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "sparsearch.cli", "study", str(study_file), "--store", str(store)]
    command += ["--workers", "1", "--no-progress", "--no-report"]
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def attempts(store: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(store, timeout=30) as connection:
        return connection.execute("SELECT trial_key, owner, outcome FROM attempt ORDER BY rowid").fetchall()


def owner_pid(owner: str) -> int:
    return int(owner.rsplit(":", 2)[1])


@pytest.mark.slow
def test_two_processes_share_the_trials_and_each_runs_once(tmp_path, single_process):
    study_file, store = tmp_path / "s.toml", tmp_path / "s.sqlite"
    study_file.write_text(STUDY_TOML)
    first = start_study(study_file, store, tmp_path / "first.log")
    second = start_study(study_file, store, tmp_path / "second.log")
    try:
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    log = attempts(store)
    # every trial was claimed and run once, and finished: no trial twice, none left out
    assert sorted(key for key, _, _ in log) == sorted(stable_numbers(store)[0])
    assert len(log) == TRIAL_COUNT and {outcome for _, _, outcome in log} == {"done"}
    owners = {owner_pid(owner) for _, owner, _ in log}
    assert owners == {first.pid, second.pid}  # both did part of the work
    assert stable_numbers(store) == single_process
    # each process waited for the other's trials, so both end with the study complete and say who ran what
    outputs = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    assert "run by other processes" in outputs


@pytest.mark.slow
def test_the_other_process_takes_over_the_trial_of_one_killed_with_minus_nine(tmp_path, single_process):
    study_file, store = tmp_path / "s.toml", tmp_path / "s.sqlite"
    study_file.write_text(STUDY_TOML)
    victim = start_study(study_file, store, tmp_path / "victim.log")
    survivor = start_study(study_file, store, tmp_path / "survivor.log")
    try:
        # wait until both hold a trial that has started training, then kill one in the middle of it
        deadline, running = time.monotonic() + 120, {}
        while time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.2)
            if store.exists():
                try:
                    with sqlite3.connect(store, timeout=1) as connection:
                        running = dict(
                            connection.execute(
                                "SELECT owner, key FROM trial WHERE status = 'running' AND started IS NOT NULL"
                            ).fetchall()
                        )
                        epochs = connection.execute("SELECT COUNT(*) FROM epoch").fetchone()[0]
                except sqlite3.OperationalError:
                    continue
                if {owner_pid(owner) for owner in running} == {victim.pid, survivor.pid} and epochs:
                    break
        assert victim.poll() is None, "the study ended before one process could be killed"
        victim_trial = next(key for owner, key in running.items() if owner_pid(owner) == victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()
    log = attempts(store)
    by_trial: dict[str, list[tuple[int, str | None]]] = {}
    for key, owner, outcome in log:
        by_trial.setdefault(key, []).append((owner_pid(owner), outcome))
    # the killed trial: the victim's attempt expired, the survivor ran it once more to the end
    assert by_trial[victim_trial] == [(victim.pid, "expired"), (survivor.pid, "done")]
    # every trial finished exactly once
    assert sorted(by_trial) == sorted(stable_numbers(store)[0])
    assert all([outcome for _, outcome in runs].count("done") == 1 for runs in by_trial.values())
    assert stable_numbers(store) == single_process
    with StudyStore(store, create=False) as reader:
        assert reader.status_counts("shared") == {"done": TRIAL_COUNT}
        assert all(len(curve) == 6 for curve in reader.epoch_rows("shared").values())
