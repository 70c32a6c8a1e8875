"""The results store: one SQLite file holding studies, their trials, per-epoch curves and final metrics.

Only the study's parent process writes (workers send their numbers back), so there is a single writer; WAL
mode lets ``sparsearch report`` read while a study runs. A finished trial's metrics and all its epoch rows
are committed in one transaction, so a trial is either completely stored as "done" or re-run on resume.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRIAL_STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS study (
    name TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trial (
    study TEXT NOT NULL REFERENCES study(name),
    key TEXT NOT NULL,
    arm TEXT NOT NULL,
    sparsity REAL NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    started REAL,
    finished REAL,
    test_accuracy REAL,
    val_accuracy REAL,
    params_total INTEGER,
    params_nonzero INTEGER,
    flops_dense INTEGER,
    flops_nonzero INTEGER,
    train_flops INTEGER,
    weight_sparsity REAL,
    node_sparsity REAL,
    search_json TEXT,
    train_seconds REAL,
    wall_seconds REAL,
    error TEXT,
    PRIMARY KEY (study, key)
);
CREATE TABLE IF NOT EXISTS epoch (
    study TEXT NOT NULL,
    trial_key TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    train_loss REAL NOT NULL,
    val_accuracy REAL NOT NULL,
    test_accuracy REAL NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (study, trial_key, epoch)
);
"""


# columns added after the first release, with their declarations; _add_missing_columns adds them to old stores
_ADDED_TRIAL_COLUMNS = {"notes_json": "TEXT"}


@dataclass(frozen=True)
class TrialSpec:
    """One unit of work: an arm at a sparsity with a seed (the dense arm has sparsity 0)."""

    arm: str
    sparsity: float
    seed: int

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``search-node/s0.9/seed2``."""
        return f"{self.arm}/s{self.sparsity:g}/seed{self.seed}"


@dataclass(frozen=True)
class EpochRow:
    """Metrics after one training epoch (1-based) of a trial."""

    epoch: int
    step: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float


@dataclass(frozen=True)
class TrialOutcome:
    """Final metrics of a finished trial, with its whole training curve."""

    test_accuracy: float
    val_accuracy: float
    params_total: int
    params_nonzero: int
    flops_dense: int
    flops_nonzero: int
    train_flops: int
    weight_sparsity: float
    node_sparsity: float
    train_seconds: float
    wall_seconds: float
    epochs: tuple[EpochRow, ...]
    search: Mapping[str, Any] | None = field(default=None)
    notes: tuple[str, ...] = ()  # what the trial's search space says about the model (layers kept whole, ...)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA busy_timeout = 30000")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


class StudyStore:
    """Read and write one SQLite results file. Use one instance per process.

    Args:
        path: the SQLite file.
        create: create the file (and its folder) if missing; readers pass False and get FileNotFoundError.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(
                    f"results store {str(self.path)!r} does not exist; run `sparsearch study` first"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.is_dir():
            raise ValueError(f"results store {str(self.path)!r} is a folder; give the path of a .sqlite file")
        try:
            self.connection = _connect(self.path)
            self.connection.executescript(_SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{str(self.path)!r} is not a sparsearch results store (SQLite said: {error})") from None

    def _add_missing_columns(self) -> None:
        """Bring a store written by an older sparsearch up to this schema (columns are only ever added)."""
        columns = {row["name"] for row in self.connection.execute("PRAGMA table_info(trial)")}
        for name, declaration in _ADDED_TRIAL_COLUMNS.items():
            if name not in columns:
                self.connection.execute(f"ALTER TABLE trial ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _transaction(self) -> sqlite3.Connection:
        self.connection.execute("BEGIN IMMEDIATE")
        return self.connection

    # ------------------------------------------------------------------------------------- studies
    def study_names(self) -> list[str]:
        """Names of the studies in this store, oldest first."""
        return [row["name"] for row in self.connection.execute("SELECT name FROM study ORDER BY created")]

    def study_config(self, name: str) -> dict[str, Any]:
        """The stored configuration of study ``name`` (as JSON data)."""
        row = self.connection.execute("SELECT config_json FROM study WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ValueError(
                f"store {str(self.path)!r} holds no study named {name!r}; it holds: {', '.join(self.study_names())}"
            )
        return json.loads(row["config_json"])

    def register_study(
        self, name: str, config: Mapping[str, Any], config_hash: str, trials: Iterable[TrialSpec]
    ) -> int:
        """Record the study and its trials as pending; return how many trials are new.

        Registering the same study again (same name and hash) adds nothing. A different study under the same
        name raises ValueError and changes nothing.
        """
        trials = list(trials)
        connection = self._transaction()
        try:
            row = connection.execute("SELECT config_hash FROM study WHERE name = ?", (name,)).fetchone()
            if row is not None and row["config_hash"] != config_hash:
                raise ValueError(
                    f"store {str(self.path)!r} already holds a different study named {name!r} "
                    f"(stored config hash {row['config_hash']}, this one {config_hash}); nothing was changed. "
                    "Give the study a new name, or use another store with --store PATH"
                )
            if row is None:
                connection.execute(
                    "INSERT INTO study (name, config_json, config_hash, created) VALUES (?, ?, ?, ?)",
                    (name, json.dumps(dict(config), sort_keys=True), config_hash, time.time()),
                )
            before = connection.total_changes
            connection.executemany(
                "INSERT OR IGNORE INTO trial (study, key, arm, sparsity, seed) VALUES (?, ?, ?, ?, ?)",
                [(name, t.key, t.arm, t.sparsity, t.seed) for t in trials],
            )
            added = connection.total_changes - before
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return added

    # -------------------------------------------------------------------------------------- trials
    def reset_unfinished(self, study: str) -> int:
        """Make every trial that is not done pending again and drop its partial epoch rows; return the count."""
        connection = self._transaction()
        connection.execute(
            "DELETE FROM epoch WHERE study = ? AND trial_key IN "
            "(SELECT key FROM trial WHERE study = ? AND status != 'done')",
            (study, study),
        )
        cursor = connection.execute(
            "UPDATE trial SET status = 'pending', started = NULL, error = NULL WHERE study = ? AND status != 'done'",
            (study,),
        )
        connection.execute("COMMIT")
        return cursor.rowcount

    def trials_with_status(self, study: str, status: str) -> list[TrialSpec]:
        """Trials of ``study`` in ``status``, in a stable order."""
        if status not in TRIAL_STATUSES:
            raise ValueError(f"unknown trial status {status!r}; allowed: {', '.join(TRIAL_STATUSES)}")
        rows = self.connection.execute(
            "SELECT arm, sparsity, seed FROM trial WHERE study = ? AND status = ? ORDER BY rowid", (study, status)
        )
        return [TrialSpec(row["arm"], row["sparsity"], row["seed"]) for row in rows]

    def mark_running(self, study: str, key: str, started: float) -> None:
        """Note that a worker began ``key``."""
        self.connection.execute(
            "UPDATE trial SET status = 'running', started = ? WHERE study = ? AND key = ? AND status != 'done'",
            (started, study, key),
        )

    def add_epoch(self, study: str, key: str, row: EpochRow) -> None:
        """Stream one epoch of a running trial (replaced by the final rows when the trial finishes)."""
        self.connection.execute(
            "INSERT OR REPLACE INTO epoch VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (study, key, row.epoch, row.step, row.train_loss, row.val_accuracy, row.test_accuracy, row.seconds),
        )

    def finish_trial(self, study: str, key: str, outcome: TrialOutcome) -> None:
        """Store a finished trial's metrics and its complete curve atomically."""
        connection = self._transaction()
        try:
            connection.execute("DELETE FROM epoch WHERE study = ? AND trial_key = ?", (study, key))
            connection.executemany(
                "INSERT INTO epoch VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (study, key, e.epoch, e.step, e.train_loss, e.val_accuracy, e.test_accuracy, e.seconds)
                    for e in outcome.epochs
                ],
            )
            connection.execute(
                """UPDATE trial SET status = 'done', finished = ?, test_accuracy = ?, val_accuracy = ?,
                   params_total = ?, params_nonzero = ?, flops_dense = ?, flops_nonzero = ?, train_flops = ?,
                   weight_sparsity = ?, node_sparsity = ?, search_json = ?, train_seconds = ?, wall_seconds = ?,
                   notes_json = ?, error = NULL
                   WHERE study = ? AND key = ?""",
                (
                    time.time(),
                    outcome.test_accuracy,
                    outcome.val_accuracy,
                    outcome.params_total,
                    outcome.params_nonzero,
                    outcome.flops_dense,
                    outcome.flops_nonzero,
                    outcome.train_flops,
                    outcome.weight_sparsity,
                    outcome.node_sparsity,
                    json.dumps(outcome.search) if outcome.search is not None else None,
                    outcome.train_seconds,
                    outcome.wall_seconds,
                    json.dumps(list(outcome.notes)) if outcome.notes else None,
                    study,
                    key,
                ),
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def fail_trial(self, study: str, key: str, error: str) -> None:
        """Record that a trial raised; it is re-run on the next resume."""
        self.connection.execute(
            "UPDATE trial SET status = 'failed', finished = ?, error = ? WHERE study = ? AND key = ?",
            (time.time(), error, study, key),
        )

    # ------------------------------------------------------------------------------------- reading
    def trial_rows(self, study: str) -> list[dict[str, Any]]:
        """Every trial of ``study`` as a dict of its columns."""
        rows = self.connection.execute("SELECT * FROM trial WHERE study = ? ORDER BY rowid", (study,))
        return [dict(row) for row in rows]

    def epoch_rows(self, study: str) -> dict[str, list[EpochRow]]:
        """Epoch rows by trial key, in epoch order."""
        curves: dict[str, list[EpochRow]] = {}
        rows = self.connection.execute("SELECT * FROM epoch WHERE study = ? ORDER BY trial_key, epoch", (study,))
        for row in rows:
            curves.setdefault(row["trial_key"], []).append(
                EpochRow(
                    row["epoch"],
                    row["step"],
                    row["train_loss"],
                    row["val_accuracy"],
                    row["test_accuracy"],
                    row["seconds"],
                )
            )
        return curves
