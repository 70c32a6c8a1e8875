"""The results store: one SQLite file holding studies, their trials, per-epoch curves and final metrics.

Several study processes may work on one store at once (each writes only from its parent process; its workers
send their numbers back). A process claims one pending trial at a time in a ``BEGIN IMMEDIATE`` transaction,
so each trial has one owner (``host:pid:start-time``); the owner keeps a heartbeat on its claims, and a claim
whose owner is gone (same host: the process no longer exists; any host: no heartbeat for ``claim_timeout``
seconds) is released and the trial runs again from scratch. Every claim is logged in the ``attempt`` table.
A finished trial's metrics and all its epoch rows are committed in one transaction, and only by the trial's
owner, so a trial is either completely stored as "done" once or re-run. WAL mode lets ``sparsearch report``
read while studies run; WAL needs every process on one host (SQLite's shared memory), see the README.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
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
CREATE TABLE IF NOT EXISTS attempt (
    study TEXT NOT NULL,
    trial_key TEXT NOT NULL,
    owner TEXT NOT NULL,
    claimed REAL NOT NULL,
    started REAL,
    worker TEXT,
    ended REAL,
    outcome TEXT
);
"""


# columns added after the first release, with their declarations; _add_missing_columns adds them to old stores
_ADDED_TRIAL_COLUMNS = {"notes_json": "TEXT", "owner": "TEXT", "heartbeat": "REAL"}

# how an attempt (one claim of a trial) ended; NULL while it runs
ATTEMPT_OUTCOMES = ("done", "failed", "released", "expired")

DEFAULT_CLAIM_TIMEOUT = 60.0
CLAIM_TIMEOUT_VARIABLE = "SPARSEARCH_CLAIM_TIMEOUT"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None if it is gone or a zombie.

    With the pid it names one process for good: a pid reused by a later process has another start time.
    """
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def owner_id(pid: int | None = None) -> str:
    """This process's claim owner id, ``host:pid:start-time`` (start time 0 where /proc is missing)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or 0}"


def owner_is_gone(owner: str) -> bool:
    """True if ``owner`` ran on this host and that process no longer exists; False if it lives or is elsewhere."""
    host, pid, start = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    if Path("/proc").is_dir():
        return _process_start(int(pid)) != start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_timeout_from_environment() -> float:
    """Seconds without a heartbeat after which a claim of another host is released (``SPARSEARCH_CLAIM_TIMEOUT``)."""
    text = os.environ.get(CLAIM_TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_CLAIM_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{CLAIM_TIMEOUT_VARIABLE} must be a number of seconds above 0, got {text!r}")
    return value


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
        owner: the id this instance claims trials under (default: this process, see ``owner_id``).
        claim_timeout: seconds without a heartbeat after which another owner's claim is released (default:
            ``SPARSEARCH_CLAIM_TIMEOUT`` or 60); claims of dead processes on this host are released at once.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        owner: str | None = None,
        claim_timeout: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.owner = owner or owner_id()
        self.claim_timeout = claim_timeout if claim_timeout is not None else claim_timeout_from_environment()
        if not self.claim_timeout > 0:
            raise ValueError(f"claim_timeout must be above 0 seconds, got {self.claim_timeout}")
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
        """Bring a store written by an older sparsearch up to this schema (columns are only ever added).

        The columns are read again inside a write transaction: processes that open the same store at once (a
        shared study starting on several machines) would otherwise all see a column missing, and all but the
        first would fail adding it ("duplicate column name")."""
        if _ADDED_TRIAL_COLUMNS.keys() <= self._trial_columns():
            return
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            columns = self._trial_columns()
            for name, declaration in _ADDED_TRIAL_COLUMNS.items():
                if name not in columns:
                    self.connection.execute(f"ALTER TABLE trial ADD COLUMN {name} {declaration}")
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def _trial_columns(self) -> set[str]:
        return {row["name"] for row in self.connection.execute("PRAGMA table_info(trial)")}

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
    def retry_failed(self, study: str) -> int:
        """Make the failed trials of ``study`` pending again (a new run retries them); return the count."""
        connection = self._transaction()
        try:
            cursor = connection.execute(
                "UPDATE trial SET status = 'pending', owner = NULL, heartbeat = NULL, started = NULL, error = NULL "
                "WHERE study = ? AND status = 'failed'",
                (study,),
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return cursor.rowcount

    def _stale_claims(self, study: str, now: float) -> list[tuple[str, str | None]]:
        """(key, owner) of the running trials whose owner is gone or silent for longer than the claim timeout.

        This owner's own claims are never stale to itself (it is alive, whatever its heartbeat says).
        """
        rows = self.connection.execute(
            "SELECT key, owner, heartbeat FROM trial WHERE study = ? AND status = 'running' AND owner IS NOT ?",
            (study, self.owner),
        ).fetchall()
        return [
            (row["key"], row["owner"])
            for row in rows
            if row["owner"] is None  # written by a sparsearch without claims, or by hand: nobody holds it
            or row["heartbeat"] is None
            or now - row["heartbeat"] > self.claim_timeout
            or owner_is_gone(row["owner"])
        ]

    def _release(self, study: str, claims: list[tuple[str, str | None]], outcome: str, now: float) -> None:
        # inside a transaction: the trials become pending with no partial curve, their attempts are closed
        for key, owner in claims:
            self.connection.execute(
                "UPDATE trial SET status = 'pending', owner = NULL, heartbeat = NULL, started = NULL "
                "WHERE study = ? AND key = ? AND status = 'running' AND owner IS ?",
                (study, key, owner),
            )
            self.connection.execute("DELETE FROM epoch WHERE study = ? AND trial_key = ?", (study, key))
            self.connection.execute(
                "UPDATE attempt SET ended = ?, outcome = ? WHERE study = ? AND trial_key = ? AND owner IS ? "
                "AND ended IS NULL",
                (now, outcome, study, key, owner),
            )

    def release_stale_claims(self, study: str) -> int:
        """Release the claims of owners that are gone (see the class); return how many trials became pending."""
        connection = self._transaction()
        try:
            now = time.time()
            stale = self._stale_claims(study, now)
            self._release(study, stale, "expired", now)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return len(stale)

    def claim_next(self, study: str) -> TrialSpec | None:
        """Claim the first pending trial of ``study`` for this owner, atomically; None if none is pending.

        Stale claims of other owners are released first, in the same transaction, so their trials are claimable.
        """
        connection = self._transaction()
        try:
            now = time.time()
            self._release(study, self._stale_claims(study, now), "expired", now)
            row = connection.execute(
                "SELECT key, arm, sparsity, seed FROM trial WHERE study = ? AND status = 'pending' ORDER BY rowid "
                "LIMIT 1",
                (study,),
            ).fetchone()
            if row is not None:
                connection.execute(
                    "UPDATE trial SET status = 'running', owner = ?, heartbeat = ?, started = NULL, error = NULL "
                    "WHERE study = ? AND key = ?",
                    (self.owner, now, study, row["key"]),
                )
                connection.execute("DELETE FROM epoch WHERE study = ? AND trial_key = ?", (study, row["key"]))
                connection.execute(
                    "INSERT INTO attempt (study, trial_key, owner, claimed) VALUES (?, ?, ?, ?)",
                    (study, row["key"], self.owner, now),
                )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return None if row is None else TrialSpec(row["arm"], row["sparsity"], row["seed"])

    def release_own_claims(self, study: str) -> int:
        """Give this owner's running trials back (pending, partial curves dropped), e.g. on Ctrl-C."""
        connection = self._transaction()
        try:
            keys = [
                (row["key"], self.owner)
                for row in connection.execute(
                    "SELECT key FROM trial WHERE study = ? AND status = 'running' AND owner = ?", (study, self.owner)
                )
            ]
            self._release(study, keys, "released", time.time())
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return len(keys)

    def running_elsewhere(self, study: str) -> dict[str, str]:
        """Trials of ``study`` that other owners are running, as {key: owner}."""
        rows = self.connection.execute(
            "SELECT key, owner FROM trial WHERE study = ? AND status = 'running' AND owner IS NOT ?",
            (study, self.owner),
        )
        return {row["key"]: row["owner"] for row in rows}

    def status_counts(self, study: str) -> dict[str, int]:
        """How many trials of ``study`` are in each status."""
        rows = self.connection.execute("SELECT status, COUNT(*) FROM trial WHERE study = ? GROUP BY status", (study,))
        return {status: count for status, count in rows}

    @contextlib.contextmanager
    def heartbeat(self, interval: float | None = None) -> Iterator[None]:
        """Keep this owner's claims alive from a background thread (its own connection) while the block runs.

        A thread, not the main loop: an inline trial can keep the main thread busy for longer than the timeout.
        """
        interval = interval if interval is not None else max(0.5, min(10.0, self.claim_timeout / 4))
        stop = threading.Event()

        def beat() -> None:
            connection = _connect(self.path)
            try:
                while not stop.wait(interval):
                    connection.execute(
                        "UPDATE trial SET heartbeat = ? WHERE owner = ? AND status = 'running'",
                        (time.time(), self.owner),
                    )
            finally:
                connection.close()

        thread = threading.Thread(target=beat, name="sparsearch-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # the trial's writes below apply only while it is not done and this owner holds it (or nobody does, for
    # direct use of the store without claims): a process that lost its claim cannot overwrite the new owner
    _MINE = "study = ? AND key = ? AND status != 'done' AND (owner IS NULL OR owner = ?)"

    def trials_with_status(self, study: str, status: str) -> list[TrialSpec]:
        """Trials of ``study`` in ``status``, in a stable order."""
        if status not in TRIAL_STATUSES:
            raise ValueError(f"unknown trial status {status!r}; allowed: {', '.join(TRIAL_STATUSES)}")
        rows = self.connection.execute(
            "SELECT arm, sparsity, seed FROM trial WHERE study = ? AND status = ? ORDER BY rowid", (study, status)
        )
        return [TrialSpec(row["arm"], row["sparsity"], row["seed"]) for row in rows]

    def mark_running(self, study: str, key: str, started: float, worker: str = "") -> None:
        """Note that a worker (``host:pid``, where known) began ``key``."""
        connection = self._transaction()
        try:
            cursor = connection.execute(
                f"UPDATE trial SET status = 'running', started = ? WHERE {self._MINE}",
                (started, study, key, self.owner),
            )
            if cursor.rowcount:
                connection.execute(
                    "UPDATE attempt SET started = ?, worker = ? WHERE study = ? AND trial_key = ? AND owner = ? "
                    "AND ended IS NULL",
                    (started, worker or None, study, key, self.owner),
                )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def add_epoch(self, study: str, key: str, row: EpochRow) -> None:
        """Stream one epoch of a running trial (replaced by the final rows when the trial finishes)."""
        values = (study, key, row.epoch, row.step, row.train_loss, row.val_accuracy, row.test_accuracy, row.seconds)
        self.connection.execute(
            f"INSERT OR REPLACE INTO epoch SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM trial WHERE "
            f"{self._MINE})",
            (*values, study, key, self.owner),
        )

    def finish_trial(self, study: str, key: str, outcome: TrialOutcome) -> bool:
        """Store a finished trial's metrics and its complete curve atomically; False if another owner holds it."""
        connection = self._transaction()
        try:
            mine = connection.execute(f"SELECT 1 FROM trial WHERE {self._MINE}", (study, key, self.owner)).fetchone()
            if mine is None:
                connection.execute("ROLLBACK")
                return False
            now = time.time()
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
                   notes_json = ?, error = NULL, heartbeat = NULL
                   WHERE study = ? AND key = ?""",
                (
                    now,
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
            self._close_attempt(study, key, "done", now)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return True

    def fail_trial(self, study: str, key: str, error: str) -> bool:
        """Record that a trial raised (it is re-run by the next run); False if another owner holds it."""
        connection = self._transaction()
        try:
            now = time.time()
            cursor = connection.execute(
                f"UPDATE trial SET status = 'failed', finished = ?, error = ?, heartbeat = NULL WHERE {self._MINE}",
                (now, error, study, key, self.owner),
            )
            if cursor.rowcount:
                self._close_attempt(study, key, "failed", now)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return bool(cursor.rowcount)

    def _close_attempt(self, study: str, key: str, outcome: str, now: float) -> None:
        self.connection.execute(
            "UPDATE attempt SET ended = ?, outcome = ? WHERE study = ? AND trial_key = ? AND owner = ? "
            "AND ended IS NULL",
            (now, outcome, study, key, self.owner),
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

    def attempts(self, study: str) -> list[dict[str, Any]]:
        """Every claim of a trial of ``study`` (owner, worker, times, outcome), in claim order."""
        rows = self.connection.execute("SELECT * FROM attempt WHERE study = ? ORDER BY rowid", (study,))
        return [dict(row) for row in rows]
